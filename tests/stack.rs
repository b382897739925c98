//! Whole-stack tests in process on tokio's paused clock (see
//! `support::in_process`): the figures are exact, not within a tolerance,
//! and nothing sleeps on the real clock.

use std::time::Duration;

use anteroom::config::{Models, Upstreams};
use anteroom::sim::{Mode, SimConfig};
use anteroom::telemetry::{Outcome, TokenSource};
use http_body_util::BodyExt;

use crate::support::in_process::{in_process, memory_host, memory_sim, settle, stack, wait_for};
use crate::support::{body_json, entry, header_u64, sim_config};

#[tokio::test(start_paused = true)]
async fn queue_wait_and_model_time_are_split_exactly() {
    let cfg = SimConfig {
        ttft: Duration::from_millis(150),
        tokens_per_second: 50.0, // 20 ms per token
        ..sim_config(Mode::Serial)
    };
    let p = in_process("split", cfg, |c| c.max_concurrency = 1.into());
    // A holds the one slot for 150 + 9 × 20 ms; B waits for all of it.
    let a = {
        let (stack, req) = (p.clone_sender(), p.chat("split-a", None, true, 10));
        tokio::spawn(async move { stack.send(req).await.into_body().collect().await.unwrap() })
    };
    settle().await;
    assert_eq!(p.counts(), (0, 1), "A runs");
    let sent = tokio::time::Instant::now();
    let b = p.send(p.chat("split-b", None, true, 10)).await;
    let queue_header = header_u64(&b, "x-anteroom-queue-ms").unwrap();
    let timing = b.headers()["server-timing"].to_str().unwrap().to_owned();
    let mut body = b.into_body();
    let first = loop {
        let frame = body.frame().await.unwrap().unwrap();
        if frame.data_ref().is_some_and(|d| !d.is_empty()) {
            break sent.elapsed();
        }
    };
    while body.frame().await.is_some() {}
    a.await.unwrap();

    let recs = p.records().await;
    let (a, b) = (&recs["split-a"], &recs["split-b"]);
    assert_eq!(b.outcome, Outcome::Ok);
    assert_eq!((b.status, b.stream, b.priority), (200, true, Some(0)));
    // B was dispatched the instant A's last byte left.
    assert_eq!(b.timings.queue_ms, a.timings.e2e_ms);
    // The model's own times are the simulator's settings, exactly.
    assert_eq!(b.timings.backend_ttft_ms, Some(150.0));
    assert_eq!(b.timings.tpot_ms, Some(20.0));
    assert_eq!(b.timings.itl_p50_ms, Some(20.0));
    assert_eq!(b.timings.itl_max_ms, Some(20.0));
    assert_eq!(
        (b.model.as_deref(), b.path.as_str()),
        (Some("anteroom-sim"), "/v1/chat/completions")
    );
    // Every field as the README's record table has it.
    let t = &b.timings;
    let itl = [t.itl_p50_ms, t.itl_p90_ms, t.itl_p99_ms, t.itl_max_ms];
    assert_eq!(itl, [Some(20.0); 4]);
    assert!(
        t.upstream_headers_ms.unwrap() <= t.backend_ttft_ms.unwrap(),
        "{t:?}"
    );
    // Ten token events, the finish chunk and [DONE]; counted, not told.
    assert_eq!(t.events, Some(12));
    assert_eq!(t.completion_tokens, Some(10));
    assert_eq!(t.tokens_from, Some(TokenSource::Counted));
    assert_eq!(
        (t.prompt_tokens, t.backend_prompt_ms, t.backend_wait_ms),
        (None, None, None)
    );
    assert!(!t.malformed && t.upstream_retries == 0 && !b.upgraded);
    assert_eq!(
        (b.upstream.as_deref(), b.tenant.as_deref()),
        (Some("upstream"), None)
    );
    // What the client saw is the sum, to the microsecond of its stopwatch.
    let queue = t.queue_ms.unwrap();
    assert_eq!(t.ttft_ms, Some(queue + 150.0));
    assert_eq!(first.as_secs_f64() * 1000.0, queue + 150.0);
    // The headers say the same.
    assert_eq!(queue_header as f64, queue.floor());
    assert_eq!(timing, format!("queue;dur={queue:.3}, upstream;dur=0.000"));
}

/// The advised delay of a 429 is within a factor of two of the real wait,
/// with a backend of known service time.
#[tokio::test(start_paused = true)]
async fn the_advised_delay_matches_the_real_drain() {
    let cfg = SimConfig {
        ttft: Duration::from_millis(40),
        tokens_per_second: 1000.0,
        ..sim_config(Mode::Serial)
    };
    let p = in_process("drain", cfg, |c| {
        c.max_concurrency = 1.into();
        c.max_queue = 6;
    });
    // Warm up: the proxy measures ~50 ms per request.
    for i in 0..5 {
        let r = p.send(p.chat(&format!("w{i}"), None, false, 10)).await;
        assert_eq!(r.status(), 200);
        r.into_body().collect().await.unwrap();
    }
    let mut tasks = Vec::new();
    for i in 0..7 {
        let (sender, req) = (p.clone_sender(), p.chat(&format!("q{i}"), None, false, 10));
        tasks.push(tokio::spawn(async move {
            let r = sender.send(req).await;
            let status = r.status();
            r.into_body().collect().await.unwrap();
            status
        }));
    }
    wait_for("one running, six waiting", || p.counts() == (6, 1)).await;
    let start = tokio::time::Instant::now();
    let resp = p.send(p.chat("rejected", None, false, 10)).await;
    assert_eq!(resp.status(), 429);
    let advised = Duration::from_millis(header_u64(&resp, "retry-after-ms").unwrap());
    wait_for("the queue to drain", || p.counts().0 == 0).await;
    let true_wait = start.elapsed();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let ratio = advised.as_secs_f64() / true_wait.as_secs_f64();
    assert!(
        (0.5..=2.0).contains(&ratio),
        "advised {advised:?}, real wait {true_wait:?}"
    );
}

/// Probes every 100 ms; two failures in a row eject.
fn fast_health(c: &mut anteroom::config::FileConfig) {
    c.health_interval = "100ms".into();
    c.eject_after = 2;
    c.retry_base_delay = "10ms".into();
}

fn named(model: &str) -> SimConfig {
    SimConfig {
        model: model.into(),
        ..sim_config(Mode::Batch)
    }
}

#[tokio::test(start_paused = true)]
async fn no_healthy_upstream_is_a_503_with_retry_after() {
    let (x, y) = (memory_host("x"), memory_host("y"));
    let p = stack("no-healthy", |c| {
        c.upstream = Upstreams::Many(vec![
            entry("x", format!("http://{x}"), Models::Any, 4),
            entry("y", format!("http://{y}"), Models::Any, 4),
        ]);
        fast_health(c);
    });
    p.start_health_checks();
    // Nothing listens on either: the probes take both out of service.
    wait_for("both ejected", || {
        !p.router.is_healthy(0) && !p.router.is_healthy(1)
    })
    .await;
    let resp = p.send(p.ask("m", "none")).await;
    assert_eq!(resp.status(), 503);
    assert!(header_u64(&resp, "retry-after").unwrap() >= 1);
    let err = body_json(resp).await;
    assert_eq!(err["error"]["code"], "no_healthy_upstream");
}

#[tokio::test(start_paused = true)]
async fn an_upstream_comes_back_after_a_good_probe() {
    let a = memory_sim("a", named("m"));
    let b_host = memory_host("b");
    let ua = a.url();
    let p = stack("comes-back", |c| {
        c.upstream = Upstreams::Many(vec![
            entry("a", ua, Models::Any, 4),
            entry("b", format!("http://{b_host}"), Models::Any, 4),
        ]);
        fast_health(c);
    });
    p.start_health_checks();
    // Probes find b down and take it out of service.
    wait_for("b ejected", || !p.router.is_healthy(1)).await;
    for i in 0..5 {
        let resp = p.send(p.ask("m", &format!("before{i}"))).await;
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(a.stats().received, 5, "nothing tried the ejected one");
    // b starts; the next good probe brings it back, and it gets work again.
    let b = anteroom::sim::spawn_in_memory(&b_host, named("m")).unwrap();
    wait_for("b back in service", || p.router.is_healthy(1)).await;
    for i in 0..4 {
        let resp = p.send(p.ask("m", &format!("after{i}"))).await;
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(b.stats().received, 2, "the two share the work again");
    assert_eq!(a.stats().received, 7);
}

/// An urgent request preempts a running non-streamed one, which then
/// completes whole; on the paused clock the wasted backend time is exactly
/// how long the first attempt ran.
#[tokio::test(start_paused = true)]
async fn an_urgent_request_preempts_a_running_non_streamed_one_which_then_completes() {
    let p = in_process("preempt-json", sim_config(Mode::Serial), |c| {
        c.max_concurrency = 1.into();
        c.preempt = true;
    });
    let events = |p: &crate::support::in_process::InProcess| p.sims[0].stats().events;
    // 3,000 tokens at 1,000 a second: three seconds of generation.
    let sent = tokio::time::Instant::now();
    let batch = {
        let (sender, req) = (p.clone_sender(), p.chat("batch", Some(10), false, 3000));
        tokio::spawn(async move {
            let resp = sender.send(req).await;
            (resp.status(), body_json(resp).await)
        })
    };
    wait_for("batch started", || {
        events(&p).contains(&"start batch".to_string())
    })
    .await;
    // Let it run: that generation is what preemption throws away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ran = sent.elapsed();
    let resp = p.send(p.chat("urgent", Some(0), false, 2)).await;
    assert_eq!(resp.status(), 200);
    let urgent = body_json(resp).await;
    assert_eq!(urgent["usage"]["completion_tokens"], 2);
    let (status, body) = batch.await.unwrap();
    assert_eq!(status, 200);
    // Its own answer, whole: the simulator names it after the request id.
    assert_eq!(body["id"], "cmpl-sim-batch", "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3000);
    assert_eq!(
        events(&p),
        [
            "start batch",
            "cancel batch",
            "start urgent",
            "done urgent",
            "start batch",
            "done batch"
        ]
    );
    let records = p.records().await;
    assert_eq!(records.len(), 2);
    let (b, u) = (&records["batch"].timings, &records["urgent"].timings);
    assert_eq!((b.preemptions, u.preemptions), (1, 0));
    // Wasted: its first attempt, from dispatch to the urgent one's arrival.
    // Wasted: its first attempt, from dispatch (at once: the slot was free)
    // to the urgent one's arrival.
    assert_eq!(b.preempted_ms, ran.as_secs_f64() * 1000.0, "{b:?}");
    // It waited exactly while the urgent one ran (10 ms to the first
    // token, 1 ms a token), not while its own first attempt did.
    assert_eq!((u.queue_ms, u.e2e_ms), (Some(0.0), Some(11.0)));
    assert_eq!(b.queue_ms, u.e2e_ms);
    // Its second attempt: 10 ms and 2,999 more tokens; the three parts add
    // up to its whole time.
    assert_eq!(b.upstream_headers_ms, Some(3009.0));
    assert_eq!(b.e2e_ms, Some(11.0 + b.preempted_ms + 3009.0));
    let snapshot = p.router.table().row(0).scheduler.snapshot();
    let status = serde_json::to_value(&snapshot.preempted).unwrap();
    assert_eq!(status["10"]["preemptions"], 1, "{status}");
    let metrics = p.recorder.metrics.encode(&snapshot, &[]);
    assert!(
        metrics.contains("anteroom_preemptions_total{priority=\"10\"} 1\n"),
        "{metrics}"
    );
}
