//! Knowing the backend: identification, `max_concurrency = "backend"`, and
//! `"auto"` in front of a llama.cpp-like backend that queues what it cannot
//! serve.

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use anteroom::cli::serve::Running;
use anteroom::config::Concurrency;
use anteroom::sim::{self, Mode, SimConfig, SimHandle};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use support::*;

/// A llama-server-like simulator with `slots` slots.
fn llama(slots: usize) -> SimConfig {
    SimConfig {
        mode: Mode::Llama,
        slots,
        ttft: Duration::from_millis(20),
        tokens_per_second: 200.0,
        output_tokens: 8,
        batch_slowdown: 0.1,
        ..SimConfig::default()
    }
}

/// Poll /status until its `backend` satisfies `cond`; the last status.
async fn backend_until(
    proxy: &Running,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = proxy_status(proxy).await;
        if cond(&s["backend"]) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}; /status: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn backends_are_identified_from_their_own_endpoints() {
    let vllm = SimConfig {
        mode: Mode::Vllm,
        slots: 8,
        ..sim_config(Mode::Vllm)
    };
    let no_metrics = SimConfig {
        metrics: false,
        ..llama(2)
    };
    for (cfg, kind, slots) in [
        (llama(4), "llama.cpp", Some(4)),
        (no_metrics, "llama.cpp", Some(2)),
        (vllm, "vllm", None),
        (sim_config(Mode::Batch), "openai", None),
    ] {
        let (_sim, proxy, _) = setup(cfg, |c| c.max_concurrency = 3.into()).await;
        let s = backend_until(&proxy, kind, |b| b["kind"] == kind).await;
        let b = &s["backend"];
        assert_eq!(b["slots"].as_u64(), slots.map(|n| n as u64), "{s:#}");
        assert_eq!(b["setting"], "auto");
        assert_eq!(b["limit"], "fixed");
        assert!(b["error"].is_null(), "{s:#}");
        if kind != "openai" {
            // Running and waiting are read where the backend says them.
            assert_eq!(b["running"], 0, "{s:#}");
        }
        let text = metrics_text(&proxy).await;
        check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let info = format!(
            "anteroom_backend_info{{kind=\"{kind}\",limit=\"fixed\",upstream=\"upstream\"}} 1"
        );
        assert!(text.contains(&info), "no `{info}` in\n{text}");
        match slots {
            Some(n) => assert!(
                text.contains(&format!(
                    "anteroom_backend_slots{{upstream=\"upstream\"}} {n}"
                )),
                "{text}"
            ),
            None => assert!(!text.contains("anteroom_backend_slots{"), "{text}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_mode_follows_the_slots_across_restarts() {
    trace_init();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let sim = sim::start(addr, llama(4)).await.unwrap();
    let proxy = proxy(&sim.url(), |c| {
        c.max_concurrency = Concurrency::Backend;
        c.health_interval = "200ms".into();
    })
    .await;
    let limit = |p: &Running| p.scheduler.snapshot().max_concurrency;
    backend_until(&proxy, "4 slots", |b| b["slots"] == 4).await;
    wait_until("the limit is 4", || limit(&proxy) == 4).await;
    let s = backend_until(&proxy, "limit from the backend", |b| {
        b["limit"] == "backend"
    })
    .await;
    assert_eq!(s["max_concurrency"], 4);
    // Restarted with --parallel 2: the limit follows.
    drop(sim);
    let sim = restart(addr, llama(2)).await;
    wait_until("the limit is 2", || limit(&proxy) == 2).await;
    // Requests flow meanwhile, at most two at once at the backend.
    assert_eq!(burst(&proxy.url(), 8, "r", 4).await, vec![200; 8]);
    assert!(sim.stats().peak_in_flight <= 2, "{:?}", sim.stats());
    // Replaced by a backend that reports no slots: "auto" takes over from
    // the last limit, and says so.
    drop(sim);
    let _sim = restart(
        addr,
        SimConfig {
            slots: 8,
            ..sim_config(Mode::Vllm)
        },
    )
    .await;
    let s = backend_until(&proxy, "vllm", |b| b["kind"] == "vllm").await;
    assert!(s["backend"]["slots"].is_null(), "{s:#}");
    backend_until(&proxy, "the fallback", |b| {
        b["limit"] == "auto (the backend reports no slots)"
    })
    .await;
    assert_eq!(burst(&proxy.url(), 4, "v", 4).await, vec![200; 4]);
}

/// Start a simulator on `addr` again, once the old one has let go of it.
async fn restart(addr: SocketAddr, cfg: SimConfig) -> SimHandle {
    for _ in 0..100 {
        if let Ok(s) = sim::start(addr, cfg.clone()).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{addr} stayed in use")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_keeps_the_queue_out_of_a_one_slot_backend() {
    trace_init();
    let (sim, proxy, _) = setup(
        SimConfig {
            output_tokens: 16,
            ..llama(1)
        },
        |c| c.max_concurrency = Concurrency::Auto,
    )
    .await;
    // The slot count is known before the flood.
    backend_until(&proxy, "1 slot", |b| b["slots"] == 1).await;
    let flood: Vec<_> = (0..32)
        .map(|i| {
            let url = proxy.url();
            tokio::spawn(async move {
                let resp = chat(&client(), &url, Some(10), &format!("f{i}"), true, 16).await;
                assert_eq!(resp.status(), 200);
                body_bytes(resp).await;
            })
        })
        .collect();
    wait_until("the flood queues", || {
        proxy.scheduler.snapshot_counts().0 >= 20
    })
    .await;
    // While it drains, the backend never holds more than it serves.
    let mut polls = 0;
    let mut urgent = None;
    while flood.iter().any(|t| !t.is_finished()) {
        let stats = sim.stats();
        assert!(
            stats.waiting <= 1,
            "the queue moved into the backend: {stats:?}"
        );
        polls += 1;
        if polls == 20 {
            let received = stats.received as usize;
            let url = proxy.url();
            urgent = Some((
                received,
                tokio::spawn(async move {
                    let resp = chat(&client(), &url, Some(-1), "urgent", true, 4).await;
                    assert_eq!(resp.status(), 200);
                    body_bytes(resp).await;
                }),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (received, urgent) = urgent.expect("the flood lasted 20 polls");
    urgent.await.unwrap();
    let stats = sim.stats();
    assert!(stats.peak_waiting <= 1, "{stats:?}");
    assert_eq!(proxy.scheduler.snapshot().max_concurrency, 1);
    // The urgent request went next: at most the one being dispatched as it
    // arrived got to the backend before it.
    let at = stats.order.iter().position(|id| id == "urgent").unwrap();
    assert!(
        at <= received + 1,
        "urgent arrived {at}th, {received} before it"
    );
    assert!(polls > 20, "{polls}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_settles_at_four_slots_as_fast_as_fixed_four() {
    trace_init();
    let (sim, proxy, _) = setup(llama(4), |c| c.max_concurrency = Concurrency::Auto).await;
    backend_until(&proxy, "4 slots", |b| b["slots"] == 4).await;
    let Driven {
        samples,
        second_half: auto_done,
        ..
    } = closed_loop(&proxy, 16, Duration::from_secs(10), true).await;
    let settled_at = samples.iter().position(|&l| l == 4);
    eprintln!(
        "auto: limits {samples:?}; second half {auto_done}; {:?}",
        sim.stats()
    );
    let settled_at = settled_at.expect("reached 4");
    assert!(
        samples[settled_at..].iter().all(|&l| l == 4),
        "left 4 once there: {samples:?}"
    );
    assert!(
        samples[samples.len() / 2..].iter().all(|&l| l == 4),
        "{samples:?}"
    );
    assert!(sim.stats().peak_waiting <= 1, "{:?}", sim.stats());
    drop(proxy);
    drop(sim);
    let (_sim, fixed, _) = setup(llama(4), |c| c.max_concurrency = 4.into()).await;
    let fixed_done = closed_loop(&fixed, 16, Duration::from_secs(10), true)
        .await
        .second_half;
    eprintln!(
        "settled after {} ms; second half: auto {auto_done}, fixed 4 {fixed_done}",
        settled_at * 100
    );
    assert!(
        auto_done as f64 >= 0.95 * fixed_done as f64,
        "auto {auto_done} vs fixed {fixed_done}"
    );
}

/// A backend whose probe endpoints answer garbage, HTML, a body too large
/// or nothing at all, and whose chat endpoint works.
async fn hostile_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(anteroom::server::serve_fn(
        listener,
        |req: Request<hyper::body::Incoming>| async move {
            let reply = |body: Bytes| {
                Ok::<_, std::convert::Infallible>(Response::new(
                    Full::new(body)
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                ))
            };
            match req.uri().path() {
                "/props" => reply(Bytes::from_static(b"<html><body>props?</body></html>")),
                "/metrics" => reply(Bytes::from(vec![b'x'; 3 << 20])),
                "/slots" => reply(Bytes::from_static(b"[{\"is_processing\": \"yes\"}]")),
                "/api/version" => {
                    // Never answers within a probe's time-out.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    reply(Bytes::new())
                }
                _ => {
                    let _ = req.into_body().collect().await;
                    reply(Bytes::from_static(
                    br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
                ))
                }
            }
        },
    ));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_probes_never_stops_serving() {
    let backend = hostile_backend().await;
    let proxy = proxy(&format!("http://{backend}"), |c| {
        c.max_concurrency = Concurrency::Backend;
        c.health_interval = "100ms".into();
    })
    .await;
    // Requests are served from the first moment, probes or not.
    let started = tokio::time::Instant::now();
    assert_eq!(burst(&proxy.url(), 6, "g", 4).await, vec![200; 6]);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a request waited for a probe"
    );
    // The probe of /api/version times out: said in /status, with the limit
    // found as "auto" does.
    let s = backend_until(&proxy, "a probe failure", |b| b["error"].is_string()).await;
    let b = &s["backend"];
    assert!(
        b["error"].as_str().unwrap().contains("/api/version"),
        "{s:#}"
    );
    assert!(b["slots"].is_null(), "{s:#}");
    assert_eq!(b["limit"], "auto (the backend reports no slots)", "{s:#}");
    assert_eq!(burst(&proxy.url(), 6, "h", 4).await, vec![200; 6]);
}

#[tokio::test]
async fn probe_tells_what_a_backend_is_and_how_it_answers() {
    let llama_sim = sim(llama(3)).await;
    let r = anteroom::backend::probe::probe(&llama_sim.url(), None)
        .await
        .unwrap();
    assert_eq!(r.kind, Some("llama.cpp"));
    assert_eq!(r.slots, Some(3));
    assert_eq!(r.models, ["anteroom-sim"]);
    let plain = r.plain.clone().unwrap();
    assert_eq!(
        (plain.status, plain.usage, plain.timings),
        (200, true, true)
    );
    let stream = r.stream.clone().unwrap();
    assert_eq!(
        (stream.usage, stream.timings, stream.done),
        (true, true, Some(true))
    );
    assert_eq!(r.priority_accepted, Some(true));
    assert!(
        r.suggested
            .iter()
            .any(|l| l.starts_with("max_concurrency = \"backend\"")),
        "{r}"
    );
    assert!(r.to_string().contains("slots:    3"), "{r}");
    // A vLLM-like one: no slots, no timings; the suggestion is a number.
    let vllm_sim = sim(SimConfig {
        slots: 8,
        ..sim_config(Mode::Vllm)
    })
    .await;
    let r = anteroom::backend::probe::probe(&vllm_sim.url(), None)
        .await
        .unwrap();
    assert_eq!((r.kind, r.slots), (Some("vllm"), None));
    assert!(!r.plain.unwrap().timings);
    assert!(
        r.suggested
            .iter()
            .any(|l| l.starts_with("max_concurrency = 32")),
        "{:?}",
        r.suggested
    );
    // Nothing there: said, not a failure.
    let r = anteroom::backend::probe::probe(&format!("http://127.0.0.1:{}", free_port()), None)
        .await
        .unwrap();
    assert_eq!(r.kind, None);
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    assert!(
        r.problems[0].contains("could not reach"),
        "{:?}",
        r.problems
    );
    assert!(r.plain.is_none());
}

/// Four requests at once to a one-slot llama.cpp-like backend, through a
/// proxy with `limit`; their records, and the report of them.
async fn four_at_once(
    limit: Concurrency,
    name: &str,
) -> (Vec<anteroom::telemetry::Record>, String) {
    let log = log_path(name);
    let log_s = log.display().to_string();
    let cfg = SimConfig {
        ttft: Duration::from_millis(100),
        ..llama(1)
    };
    let (_sim, proxy, _) = setup(cfg, |c| {
        c.max_concurrency = limit;
        c.request_log = log_s;
    })
    .await;
    backend_until(&proxy, "1 slot", |b| b["slots"] == 1).await;
    wait_until("the limit", || {
        limit != Concurrency::Backend || proxy.scheduler.snapshot().max_concurrency == 1
    })
    .await;
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let url = proxy.url();
            tokio::spawn(async move {
                let resp = chat(&client(), &url, None, &format!("w{i}"), i % 2 == 0, 4).await;
                assert_eq!(resp.status(), 200);
                body_bytes(resp).await;
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let recs = records(&proxy, &log).await;
    let report = anteroom::report::render(
        &anteroom::report::read(std::fs::read(&log).unwrap().as_slice(), None).unwrap(),
        "log",
    );
    (recs, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_inside_the_backend_is_recorded() {
    // A limit above the backend's one slot: the queue moves into it, and
    // the records say so (the last of four waits behind three generations,
    // each longer than a prefill).
    let (recs, report) = four_at_once(4.into(), "backend-wait-high").await;
    assert_eq!(recs.len(), 4);
    let prefill: Vec<f64> = recs
        .iter()
        .map(|r| r.timings.backend_prompt_ms.unwrap())
        .collect();
    let waits: Vec<f64> = recs
        .iter()
        .map(|r| r.timings.backend_wait_ms.unwrap())
        .collect();
    let longest_prefill = prefill.iter().cloned().fold(0.0, f64::max);
    let longest_wait = waits.iter().cloned().fold(0.0, f64::max);
    assert!(
        longest_wait > 2.0 * longest_prefill,
        "waits {waits:?}, prefill {prefill:?}"
    );
    assert!(report.contains("| all | backend wait | 4 |"), "{report}");
    assert!(report.contains("| all | backend prefill | 4 |"), "{report}");
    // Following the backend's slot: the queue stays in anteroom, and no
    // request waited inside the backend as long as a prefill.
    let (recs, _) = four_at_once(Concurrency::Backend, "backend-wait-one").await;
    for r in &recs {
        let (wait, prefill) = (
            r.timings.backend_wait_ms.unwrap(),
            r.timings.backend_prompt_ms.unwrap(),
        );
        assert!(wait < prefill, "{r:?}");
    }
    let queued = recs
        .iter()
        .filter_map(|r| r.timings.queue_ms)
        .fold(0.0, f64::max);
    assert!(
        queued > 2.0 * longest_prefill,
        "the wait is anteroom's now: {recs:?}"
    );
}

/// A vLLM-like backend that refuses streams past `cap` running and waiting
/// with a 200 whose only event is its 503 error.
fn vllm_capped(cap: usize) -> SimConfig {
    SimConfig {
        slots: 2,
        max_queued: Some(cap),
        sse_refusal: true,
        ..sim_config(Mode::Vllm)
    }
}

async fn stream_text(url: &str, id: &str) -> (u16, Option<String>, String) {
    let resp = chat(&client(), url, None, id, true, 8).await;
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
    (status, retry, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_that_only_carries_a_refusal_is_retried_never_passed_on() {
    let log = log_path("sse-refusal");
    let log_s = log.display().to_string();
    let (sim, proxy, _) = setup(vllm_capped(3), |c| {
        c.max_concurrency = 6.into();
        c.retry_base_delay = "20ms".into();
        c.request_log = log_s;
    })
    .await;
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let url = proxy.url();
            tokio::spawn(async move { stream_text(&url, &format!("s{i}")).await })
        })
        .collect();
    for t in tasks {
        let (status, _, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(
            !body.contains("\"error\""),
            "a refusal reached the client: {body}"
        );
        assert!(
            body.contains("tok0") && body.ends_with("data: [DONE]\n\n"),
            "{body}"
        );
    }
    let refused = sim.stats().rejected;
    assert!(refused > 0, "the cap never tripped: {:?}", sim.stats());
    let recs = records(&proxy, &log).await;
    assert!(
        recs.iter()
            .all(|r| r.outcome == anteroom::telemetry::Outcome::Ok),
        "{recs:?}"
    );
    let retries: u64 = recs
        .iter()
        .map(|r| u64::from(r.timings.upstream_retries))
        .sum();
    assert_eq!(retries, refused, "each refusal was sent again once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_in_a_200_that_cannot_be_retried_is_a_503_to_the_client() {
    let log = log_path("sse-refusal-503");
    let log_s = log.display().to_string();
    // A cap of 0: every stream is refused.
    let (_sim, proxy, _) = setup(vllm_capped(0), |c| {
        c.max_retries = 1;
        c.retry_base_delay = "10ms".into();
        c.request_log = log_s;
    })
    .await;
    let (status, retry_after, body) = stream_text(&proxy.url(), "refused").await;
    assert_eq!(status, 503, "{body}");
    assert!(retry_after.is_some());
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], 503, "{body}");
    let recs = records(&proxy, &log).await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].status, 503);
    assert_eq!(recs[0].outcome, anteroom::telemetry::Outcome::Error);
    assert_eq!(recs[0].timings.upstream_retries, 1);
}
