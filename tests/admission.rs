//! Admission over real sockets, with the simulator as the backend.

use crate::support;

use anteroom::sim::Mode;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_clients_never_exceed_max_concurrency() {
    trace_init();
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.max_concurrency = 3.into();
        c.max_queue = 1000;
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (client, url) = (client.clone(), proxy.url());
        tasks.push(tokio::spawn(async move {
            let resp = chat(&client, &url, None, &format!("r{i}"), i % 2 == 0, 4).await;
            let status = resp.status();
            body_bytes(resp).await;
            status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let stats = sim.stats();
    assert_eq!(stats.received, 100);
    assert_eq!(stats.completed, 100);
    assert_eq!(
        stats.peak_in_flight, 3,
        "the backend saw exactly max_concurrency at once"
    );
    let snap = proxy.scheduler.snapshot();
    assert_eq!((snap.running, snap.waiting, snap.completed), (0, 0, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_reach_the_backend_by_priority_then_arrival() {
    trace_init();
    let (sim, proxy, client) =
        setup(sim_config(Mode::Serial), |c| c.max_concurrency = 1.into()).await;
    // A long stream holds the only slot while the others queue.
    let first = chat(&client, &proxy.url(), None, "first", true, 10_000).await;
    let priorities = [5, 1, 3, 1, 0, 5, 2, 0, 3, -1];
    let mut tasks = Vec::new();
    for (i, p) in priorities.iter().enumerate() {
        let (client, url, p) = (client.clone(), proxy.url(), *p);
        tasks.push(tokio::spawn(async move {
            let resp = chat(&client, &url, Some(p), &format!("p{p}-{i}"), false, 2).await;
            assert_eq!(resp.status(), 200);
            body_bytes(resp).await;
        }));
        // Arrival order is the order they joined the queue.
        wait_until("the request to queue", || {
            proxy.scheduler.snapshot().waiting == i + 1
        })
        .await;
    }
    drop(first);
    for t in tasks {
        t.await.unwrap();
    }
    let mut expected: Vec<(i32, usize)> = priorities.iter().copied().zip(0..).collect();
    expected.sort();
    let expected: Vec<String> = std::iter::once("first".to_string())
        .chain(expected.iter().map(|(p, i)| format!("p{p}-{i}")))
        .collect();
    assert_eq!(sim.stats().order, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_advice_and_an_openai_error() {
    trace_init();
    let (sim, proxy, client, busy) = one_slot_busy(|c| c.max_queue = 2).await;
    let mut queued = Vec::new();
    for i in 0..2 {
        let (client, url) = (client.clone(), proxy.url());
        queued.push(tokio::spawn(async move {
            chat(&client, &url, None, &format!("q{i}"), false, 1)
                .await
                .status()
        }));
    }
    wait_until("two queued", || proxy.scheduler.snapshot().waiting == 2).await;
    let resp = chat(&client, &proxy.url(), None, "over", false, 1).await;
    assert_eq!(resp.status(), 429);
    assert!(header_u64(&resp, "retry-after").unwrap() >= 1);
    assert!(header_u64(&resp, "retry-after-ms").unwrap() >= 1);
    assert_eq!(resp.headers()["x-request-id"], "over");
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = body_json(resp).await;
    assert_eq!(body["error"]["code"], "queue_full");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("queue is full"));
    drop(busy);
    for q in queued {
        assert_eq!(q.await.unwrap(), 200);
    }
    assert!(
        !sim.stats().order.contains(&"over".to_string()),
        "a rejected request never reaches the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_too_long_gets_429_queue_timeout() {
    trace_init();
    let (_sim, proxy, client, busy) = one_slot_busy(|c| c.queue_timeout = "150ms".into()).await;
    let resp = chat(&client, &proxy.url(), None, "late", false, 1).await;
    assert_eq!(resp.status(), 429);
    assert!(header_u64(&resp, "retry-after").unwrap() >= 1);
    assert_eq!(body_json(resp).await["error"]["code"], "queue_timeout");
    assert_eq!(proxy.scheduler.snapshot().waiting, 0);
    drop(busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_request_evicts_the_least_urgent_newest_from_a_full_queue() {
    trace_init();
    let (sim, proxy, client, busy) = one_slot_busy(|c| c.max_queue = 2).await;
    let spawn = |p: i32, id: &'static str| {
        let (client, url) = (client.clone(), proxy.url());
        tokio::spawn(async move {
            let resp = chat(&client, &url, Some(p), id, false, 1).await;
            let status = resp.status().as_u16();
            (status, body_bytes(resp).await)
        })
    };
    let old = spawn(10, "old10");
    wait_until("one queued", || proxy.scheduler.snapshot().waiting == 1).await;
    let new = spawn(10, "new10");
    wait_until("two queued", || proxy.scheduler.snapshot().waiting == 2).await;
    let urgent = spawn(0, "urgent");
    let (status, body) = new.await.unwrap();
    assert_eq!(status, 429);
    assert!(String::from_utf8_lossy(&body).contains("queue_full"));
    drop(busy);
    assert_eq!(urgent.await.unwrap().0, 200);
    assert_eq!(old.await.unwrap().0, 200);
    assert_eq!(sim.stats().order, ["busy", "urgent", "old10"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_the_queue_gives_its_place_up_at_once() {
    trace_init();
    let (sim, proxy, client, busy) = one_slot_busy(|c| c.queue_timeout = "60s".into()).await;
    let (c1, u1) = (client.clone(), proxy.url());
    let leaver = tokio::spawn(async move { chat(&c1, &u1, None, "leaver", false, 1).await });
    wait_until("leaver queued", || proxy.scheduler.snapshot().waiting == 1).await;
    let (c2, u2) = (client.clone(), proxy.url());
    let stayer =
        tokio::spawn(async move { chat(&c2, &u2, None, "stayer", false, 1).await.status() });
    wait_until("stayer queued", || proxy.scheduler.snapshot().waiting == 2).await;
    // Dropping the client's future closes its connection.
    leaver.abort();
    wait_until("the leaver to leave the queue", || {
        proxy.scheduler.snapshot().waiting == 1
    })
    .await;
    drop(busy);
    assert_eq!(stayer.await.unwrap(), 200);
    assert_eq!(sim.stats().order, ["busy", "stayer"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_frees_the_slot_and_ends_the_upstream_request() {
    trace_init();
    let (sim, proxy, client) =
        setup(sim_config(Mode::Serial), |c| c.max_concurrency = 1.into()).await;
    let mut stream = chat(&client, &proxy.url(), None, "stream", true, 10_000).await;
    // Read the first event, then go away.
    let first = http_body_util::BodyExt::frame(stream.body_mut())
        .await
        .unwrap()
        .unwrap();
    assert!(first.data_ref().unwrap().starts_with(b"data: "));
    let (c2, u2) = (client.clone(), proxy.url());
    let next = tokio::spawn(async move { chat(&c2, &u2, None, "next", false, 1).await.status() });
    wait_until("next queued", || proxy.scheduler.snapshot().waiting == 1).await;
    drop(stream);
    // 10,000 tokens at 1,000/s would hold the slot for 10 s: the next request
    // is served long before, because the slot came back at the disconnect.
    assert_eq!(next.await.unwrap(), 200);
    wait_until("the simulator to see the stream cancelled", || {
        sim.stats().cancelled == 1
    })
    .await;
    assert_eq!(sim.stats().order, ["stream", "next"]);
    assert_eq!(sim.stats().completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_generation_routes_pass_while_the_queue_is_full() {
    trace_init();
    let (_sim, proxy, client, busy) = one_slot_busy(|c| c.max_queue = 0).await;
    let refused = chat(&client, &proxy.url(), None, "refused", false, 1).await;
    assert_eq!(refused.status(), 429);
    let models = client
        .get(format!("{}/v1/models", proxy.url()).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    assert!(models.headers().get("x-anteroom-queue-ms").is_none());
    assert_eq!(body_json(models).await["data"][0]["id"], "anteroom-sim");
    drop(busy);
}

// The advised delay against the real drain is in `stack.rs`, on the
// paused clock.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_workers_share_one_admission() {
    let sim = sim(sim_config(Mode::Batch)).await;
    let mut file = anteroom::config::FileConfig {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        upstream: sim.url().into(),
        ..anteroom::config::FileConfig::default()
    };
    file.max_concurrency = 3.into();
    let config = file.validate().unwrap();
    let proxy = anteroom::cli::serve::start_with(&config, 2).await.unwrap();
    // A connection each: the kernel spreads them over both workers.
    let statuses = burst(&proxy.url(), 60, "w", 4).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let stats = sim.stats();
    assert_eq!(stats.completed, 60);
    assert_eq!(stats.peak_in_flight, 3, "one limit across the threads");
    let addr = proxy.addr;
    proxy.shutdown().await;
    // The workers have left their accept loops: nothing listens any more.
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[tokio::test]
async fn a_reserved_slot_lets_an_urgent_request_past_a_running_flood() {
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.max_concurrency = 2.into();
        c.reserve = vec![anteroom::config::Reservation {
            max_priority: 0,
            slots: 1,
        }];
    })
    .await;
    // 100 long batch streams: one runs, 99 wait (the other slot is reserved).
    let mut flood = Vec::new();
    for i in 0..100 {
        let (client, url) = (client.clone(), proxy.url());
        flood.push(tokio::spawn(async move {
            let resp = chat(&client, &url, Some(10), &format!("flood{i}"), true, 100_000).await;
            body_bytes(resp).await;
        }));
    }
    wait_until("the flood queued", || {
        let s = proxy.scheduler.snapshot();
        s.running == 1 && s.waiting == 99
    })
    .await;
    // The urgent request starts at once, beside the running flood stream.
    let resp = chat(&client, &proxy.url(), Some(0), "urgent", false, 2).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    let stats = sim.stats();
    assert_eq!(stats.order.len(), 2, "{:?}", stats.order);
    assert!(stats.order[0].starts_with("flood"));
    assert_eq!(stats.order[1], "urgent");
    assert_eq!(stats.peak_in_flight, 2);
    assert_eq!(stats.completed, 1, "only the urgent one has finished");
    // The flood never took the reserved slot, and the metrics say so.
    assert_eq!(proxy.scheduler.snapshot().running, 1);
    let text = proxy
        .recorder
        .metrics
        .encode(&proxy.scheduler.snapshot(), &[]);
    assert!(
        text.contains("anteroom_reserved_slots_free{max_priority=\"0\"} 1"),
        "{text}"
    );
    for f in flood {
        f.abort();
    }
}
