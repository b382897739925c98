//! Upstream back-off against a simulator that refuses requests.

use crate::support;

use std::time::Duration;

use anteroom::sim::{Mode, SimConfig};
use support::*;

async fn metric(proxy: &anteroom::cli::serve::Running, line_start: &str) -> u64 {
    let text = proxy
        .recorder
        .metrics
        .encode(&proxy.scheduler.snapshot(), &[]);
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_backend_refusing_30_percent_of_requests_never_fails_the_run() {
    trace_init();
    let cfg = SimConfig {
        reject_share: 0.3,
        reject_retry_after: Some(Duration::from_millis(20)),
        ..sim_config(Mode::Batch)
    };
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let log = dir.join(format!("backoff-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let log_s = log.display().to_string();
    let (sim, proxy, _) = setup(cfg, |c| {
        c.max_concurrency = 4.into();
        c.retry_base_delay = "10ms".into();
        // 30% refused needs ~43% retries over the run, but early in a run
        // few requests have been counted yet: room enough for both. And a
        // request refused max_retries + 1 times in a row is given up: at
        // 30% that is 0.3^9 here, not 0.3^6 (the default 5), so the run
        // never sees it.
        c.retry_budget = 1.0;
        c.max_retries = 8;
        c.request_log = log_s;
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let url = proxy.url();
        tasks.push(tokio::spawn(async move {
            let resp = chat(&client(), &url, None, &format!("r{i}"), i % 2 == 0, 3).await;
            let status = resp.status();
            body_bytes(resp).await;
            status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "the client never sees the refusals");
    }
    let stats = sim.stats();
    assert!(stats.rejected >= 12, "{stats:?}");
    assert_eq!(stats.completed, 40);
    // Every refusal was retried, none given up.
    let retried = metric(
        &proxy,
        "anteroom_upstream_retries_total{reason=\"status_429\"}",
    )
    .await;
    assert_eq!(retried, stats.rejected);
    assert!(metric(&proxy, "anteroom_upstream_pauses_total").await >= stats.rejected);
    // And each request's record says how often it was sent again.
    proxy.recorder.flush().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let recorded: u64 = text
        .lines()
        .map(|l| serde_json::from_str::<anteroom::telemetry::Record>(l).unwrap())
        .map(|r| u64::from(r.timings.upstream_retries))
        .sum();
    assert_eq!(recorded, stats.rejected);
}

#[tokio::test]
async fn the_retry_budget_caps_retries_in_a_storm_of_503s() {
    let cfg = SimConfig {
        reject_share: 1.0,
        reject_status: 503,
        ..sim_config(Mode::Batch)
    };
    let (sim, proxy, client) = setup(cfg, |c| {
        c.retry_base_delay = "2ms".into();
        c.retry_budget = 0.2;
        c.max_retries = 3;
    })
    .await;
    const N: u64 = 50;
    for i in 0..N {
        let resp = chat(&client, &proxy.url(), None, &format!("s{i}"), false, 3).await;
        assert_eq!(resp.status(), 503);
        let secs: u64 = header_u64(&resp, "retry-after").expect("Retry-After on giving up");
        assert!(secs >= 1);
        body_bytes(resp).await;
    }
    let retries = sim.stats().received - N;
    // 20% of 50 plus the reserve of 10, instead of the 150 max_retries
    // alone would send.
    assert!(retries <= 20, "{retries} retries");
    assert!(retries >= 15, "{retries} retries: the budget was used");
    let denied = metric(
        &proxy,
        "anteroom_upstream_retries_given_up_total{why=\"budget\"}",
    )
    .await;
    assert!(denied >= N - retries, "{denied}");
}

#[tokio::test]
async fn a_backend_that_refuses_over_its_own_cap_is_waited_for() {
    // The backend takes 2 at a time and answers 429 beyond (as vLLM with a
    // queue cap); anteroom was told 4.
    let cfg = SimConfig {
        reject_over: Some(2),
        reject_retry_after: Some(Duration::from_millis(30)),
        ttft: Duration::from_millis(20),
        ..sim_config(Mode::Batch)
    };
    let (sim, proxy, _) = setup(cfg, |c| {
        c.max_concurrency = 4.into();
        c.retry_base_delay = "10ms".into();
        c.max_retries = 10;
        c.retry_budget = 1.0;
    })
    .await;
    let statuses = burst(&proxy.url(), 12, "b", 3).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let stats = sim.stats();
    assert!(stats.rejected > 0, "the cap was hit: {stats:?}");
    assert_eq!(stats.completed, 12);
}

#[tokio::test]
async fn refused_connections_are_retried_on_new_ones() {
    let cfg = SimConfig {
        refuse_connections: 0.5,
        ..sim_config(Mode::Batch)
    };
    let (sim, proxy, _) = setup(cfg, |c| c.retry_base_delay = "5ms".into()).await;
    let statuses = burst(&proxy.url(), 10, "b", 3).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(sim.stats().refused_connections > 0);
    assert_eq!(sim.stats().completed, 10);
}
