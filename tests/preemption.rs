//! Preemption in front of the simulator: an urgent request takes the slot
//! of a running request nobody has seen an answer of, which is stopped at
//! the backend, waits again and is sent again; its client sees one answer.
//! Orders are read from the simulator's event log, not from clocks.

use std::time::Duration;

use anteroom::config::FileConfig;
use anteroom::sim::Mode;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

fn preempting(c: &mut FileConfig) {
    c.max_concurrency = 1.into();
    c.preempt = true;
}

/// A one-slot serial simulator behind a preempting proxy that logs its
/// requests to `name`'s log.
async fn logged(
    name: &str,
) -> (
    anteroom::sim::SimHandle,
    anteroom::cli::serve::Running,
    HttpClient,
    std::path::PathBuf,
) {
    logged_with(name, sim_config(Mode::Serial)).await
}

/// [`logged`], with this simulator.
async fn logged_with(
    name: &str,
    cfg: anteroom::sim::SimConfig,
) -> (
    anteroom::sim::SimHandle,
    anteroom::cli::serve::Running,
    HttpClient,
    std::path::PathBuf,
) {
    let log = log_path(name);
    let (sim, proxy, client) = setup(cfg, |c| {
        preempting(c);
        c.request_log = log.display().to_string();
    })
    .await;
    (sim, proxy, client, log)
}

/// POST a chat request with this body at `priority`, as `id`.
async fn post(
    client: &HttpClient,
    base: &str,
    priority: i32,
    id: &str,
    body: serde_json::Value,
) -> http::Response<hyper::body::Incoming> {
    let req = Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .header("x-priority", priority.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    client.request(req).await.unwrap()
}

fn chat(stream: bool, max_tokens: usize) -> serde_json::Value {
    serde_json::json!({
        "model": "anteroom-sim",
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hello"}],
    })
}

fn events(sim: &anteroom::sim::SimHandle) -> Vec<String> {
    sim.stats().events
}

/// Wait until the simulator has started `id`.
async fn started(sim: &anteroom::sim::SimHandle, id: &str) {
    let start = format!("start {id}");
    wait_until(&start, || events(sim).contains(&start)).await;
}

// An urgent request preempting a running non-streamed one, with exact
// wasted and queued times, is in `stack.rs` on the paused clock.

#[tokio::test]
async fn a_stream_is_preempted_only_until_its_first_byte() {
    let (sim, proxy, client) = setup(sim_config(Mode::Serial), preempting).await;
    // The simulator sends a stream's head at once: from then on it is the
    // client's, and the urgent request waits for it to end.
    let mut seen = post(&client, &proxy.url(), 10, "seen", chat(true, 500)).await;
    assert_eq!(seen.status(), 200);
    let urgent = {
        let (client, url) = (client.clone(), proxy.url());
        tokio::spawn(async move {
            let resp = post(&client, &url, 0, "urgent", chat(false, 2)).await;
            body_bytes(resp).await
        })
    };
    wait_until("the urgent one queued", || {
        proxy.scheduler.snapshot().waiting == 1
    })
    .await;
    use http_body_util::BodyExt;
    while seen.frame().await.is_some() {}
    urgent.await.unwrap();
    assert_eq!(
        events(&sim),
        ["start seen", "done seen", "start urgent", "done urgent"]
    );
    // A stream whose head has not come yet (held 3 s) is nobody's yet.
    let mut held = chat(true, 5);
    held["sim_hold_head_ms"] = 3000.into();
    let unseen = {
        let (client, url) = (client.clone(), proxy.url());
        tokio::spawn(async move {
            let resp = post(&client, &url, 10, "unseen", held).await;
            body_bytes(resp).await
        })
    };
    started(&sim, "unseen").await;
    let resp = post(&client, &proxy.url(), 0, "urgent2", chat(false, 2)).await;
    body_bytes(resp).await;
    let body = unseen.await.unwrap();
    assert!(body.ends_with(b"data: [DONE]\n\n"), "one whole stream");
    assert_eq!(
        events(&sim)[4..],
        [
            "start unseen",
            "cancel unseen",
            "start urgent2",
            "done urgent2",
            "start unseen",
            "done unseen"
        ]
    );
}

#[tokio::test]
async fn a_lent_reservation_serves_the_flood_and_an_urgent_request_at_once() {
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.max_concurrency = 2.into();
        c.preempt = true;
        c.reserve = vec![anteroom::config::Reservation {
            max_priority: 0,
            slots: 1,
        }];
    })
    .await;
    // Ten long batch requests (a minute each): both slots take them.
    let mut flood = Vec::new();
    for i in 0..10 {
        let (client, url) = (client.clone(), proxy.url());
        flood.push(tokio::spawn(async move {
            let resp = post(&client, &url, 10, &format!("flood{i}"), chat(false, 60_000)).await;
            body_bytes(resp).await;
        }));
    }
    wait_until("both slots busy with the flood", || {
        let s = proxy.scheduler.snapshot();
        s.running == 2 && s.waiting == 8
    })
    .await;
    wait_until("the simulator runs two", || sim.stats().peak_running == 2).await;
    let resp = post(&client, &proxy.url(), 0, "urgent", chat(false, 2)).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    let ev = events(&sim);
    let cancel = ev.iter().position(|e| e.starts_with("cancel flood"));
    let urgent = ev.iter().position(|e| e == "start urgent");
    assert!(
        matches!((cancel, urgent), (Some(c), Some(u)) if c < u),
        "a flood request stopped, then the urgent one started: {ev:?}"
    );
    assert_eq!(ev.iter().filter(|e| e.starts_with("done flood")).count(), 0);
    // The slot went back to the flood.
    wait_until("the flood has both slots again", || {
        proxy.scheduler.snapshot().running == 2
    })
    .await;
    for f in flood {
        f.abort();
    }
}

#[tokio::test]
async fn a_victim_whose_client_leaves_while_it_waits_again_leaves_one_record() {
    let (sim, proxy, client, log) = logged("preempt-leave").await;
    let batch = {
        let (client, url) = (client.clone(), proxy.url());
        tokio::spawn(async move { post(&client, &url, 10, "batch", chat(false, 60_000)).await })
    };
    started(&sim, "batch").await;
    // The urgent one holds the slot with a long stream.
    let urgent = post(&client, &proxy.url(), 0, "urgent", chat(true, 60_000)).await;
    wait_until("the victim waits again", || {
        proxy.scheduler.snapshot().waiting == 1
    })
    .await;
    batch.abort();
    wait_until("the victim left the queue", || {
        proxy.scheduler.snapshot().waiting == 0
    })
    .await;
    drop(urgent);
    wait_until("nothing runs", || proxy.scheduler.snapshot().running == 0).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let records = by_id(&records(&proxy, &log).await);
    let b = &records["batch"];
    assert_eq!(b.outcome, anteroom::telemetry::Outcome::Cancelled);
    assert_eq!(b.timings.preemptions, 1);
    assert_eq!(
        events(&sim)
            .iter()
            .filter(|e| e.as_str() == "start batch")
            .count(),
        1,
        "never sent again"
    );
}

#[tokio::test]
async fn preemption_turned_on_by_reload_applies_to_the_next_requests() {
    let (sim, proxy, client) = setup(sim_config(Mode::Serial), |c| {
        c.max_concurrency = 1.into();
    })
    .await;
    let mut file = FileConfig {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        upstream: sim.url().into(),
        ..FileConfig::default()
    };
    file.max_concurrency = 1.into();
    file.preempt = true;
    proxy.reloader.apply(file).unwrap();
    let batch = {
        let (client, url) = (client.clone(), proxy.url());
        tokio::spawn(async move {
            let resp = post(&client, &url, 10, "batch", chat(false, 2000)).await;
            body_bytes(resp).await
        })
    };
    started(&sim, "batch").await;
    let resp = post(&client, &proxy.url(), 0, "urgent", chat(false, 2)).await;
    body_bytes(resp).await;
    batch.await.unwrap();
    assert_eq!(
        events(&sim)[..3],
        ["start batch", "cancel batch", "start urgent"]
    );
}

#[tokio::test]
async fn a_request_preempted_while_it_backs_off_goes_again_once_whole() {
    // Every second generation request is refused with a 429 and a one
    // second Retry-After: the batch request is refused and waits it out
    // inside its slot when the urgent one takes that slot.
    let cfg = anteroom::sim::SimConfig {
        reject_share: 0.5,
        reject_status: 429,
        reject_retry_after: Some(Duration::from_secs(1)),
        ..sim_config(Mode::Serial)
    };
    let (sim, proxy, client, log) = logged_with("preempt-backoff", cfg).await;
    let resp = post(&client, &proxy.url(), 10, "warm", chat(false, 2)).await;
    assert_eq!(resp.status(), 200, "the first is let in");
    body_bytes(resp).await;
    let batch = {
        let (client, url) = (client.clone(), proxy.url());
        tokio::spawn(async move {
            let resp = post(&client, &url, 10, "batch", chat(false, 20)).await;
            (resp.status(), body_json(resp).await)
        })
    };
    wait_until("the batch request was refused once", || {
        sim.stats().rejected == 1
    })
    .await;
    let resp = post(&client, &proxy.url(), 0, "urgent", chat(false, 2)).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    let (status, body) = batch.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 20);
    let records = by_id(&records(&proxy, &log).await);
    assert_eq!(records.len(), 3);
    assert_eq!(records["batch"].timings.preemptions, 1);
    // Whatever the refusals, it ran to its end once, after the urgent one.
    let ev = events(&sim);
    let done: Vec<_> = ev.iter().filter(|e| e.starts_with("done")).collect();
    assert_eq!(done, ["done warm", "done urgent", "done batch"], "{ev:?}");
}
