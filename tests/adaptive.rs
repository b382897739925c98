//! `max_concurrency = "auto"` against a simulator with a throughput knee.

use crate::support;

use std::time::Duration;

use anteroom::config::Concurrency;
use anteroom::sim::{Mode, SimConfig};
use support::*;

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
    let Driven { samples, done, .. } = closed_loop(&proxy, 24, Duration::from_secs(8), false).await;
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
    let fixed_done = closed_loop(&fixed, 24, Duration::from_secs(8), false)
        .await
        .done;
    eprintln!("auto: {done} requests, fixed 4: {fixed_done}");
    assert!(
        done as f64 >= 0.75 * fixed_done as f64,
        "auto {done} vs fixed {fixed_done}"
    );
}
