//! `max_concurrency = "auto"` against a simulator with a throughput knee.

use crate::support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anteroom::config::Concurrency;
use anteroom::sim::{Mode, SimConfig};
use support::*;

/// Drive `clients` closed-loop clients against the proxy for `run`, sampling
/// the limit every 100 ms; returns the samples and the requests completed.
async fn drive(
    proxy: &anteroom::cli::serve::Running,
    clients: usize,
    run: Duration,
) -> (Vec<usize>, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (stop, done, url) = (stop.clone(), done.clone(), proxy.url());
        tasks.push(tokio::spawn(async move {
            let client = client();
            // Bounded in count as well as in time.
            for i in 0..2_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let resp = chat(&client, &url, None, &format!("c{c}-{i}"), false, 8).await;
                assert_eq!(resp.status(), 200);
                body_bytes(resp).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut samples = Vec::new();
    let ticks = run.as_millis() / 100;
    for _ in 0..ticks {
        tokio::time::sleep(Duration::from_millis(100)).await;
        samples.push(proxy.scheduler.snapshot().max_concurrency);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    (samples, done.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_settles_around_the_backends_knee() {
    trace_init();
    // Throughput grows to 4 in flight, is flat to 8, collapses beyond.
    let knee = || SimConfig {
        mode: Mode::Knee,
        slots: 4,
        ttft: Duration::from_millis(40),
        tokens_per_second: 100.0,
        ..SimConfig::default()
    };
    let (sim, proxy, _) = setup(knee(), |c| {
        c.max_concurrency = Concurrency::Auto;
        c.auto_min_concurrency = 1;
        c.auto_max_concurrency = 32;
    })
    .await;
    let (samples, done) = drive(&proxy, 24, Duration::from_secs(8)).await;
    // After a start-up climb, the limit stays in a band around the knee.
    let settled = &samples[samples.len() / 2..];
    let mut sorted = settled.to_vec();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2];
    eprintln!(
        "limit samples: {samples:?}; {done} requests; sim peak {}",
        sim.stats().peak_in_flight
    );
    assert!(
        (3..=9).contains(&median),
        "median limit {median}: {settled:?}"
    );
    assert!(
        *sorted.last().unwrap() <= 12,
        "never far past the collapse: {settled:?}"
    );
    drop(proxy);
    drop(sim);

    // The best fixed limit (the knee itself) does not do much better: the
    // same load against a fresh simulator with max_concurrency = 4.
    let (_sim, fixed, _) = setup(knee(), |c| c.max_concurrency = 4.into()).await;
    let (_, fixed_done) = drive(&fixed, 24, Duration::from_secs(8)).await;
    eprintln!("auto: {done} requests, fixed 4: {fixed_done}");
    assert!(
        done as f64 >= 0.75 * fixed_done as f64,
        "auto {done} vs fixed {fixed_done}"
    );
}
