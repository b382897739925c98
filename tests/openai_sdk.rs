//! A real client: the official OpenAI Python SDK, through anteroom.
//!
//! The SDK is installed into a virtual environment under the target dir on
//! first use (or taken from `ANTEROOM_PYTHON`, which .ci/run sets); without
//! python3 and the package index this test fails, it does not skip.

use crate::support;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use anteroom::cli::serve::Running;
use anteroom::sim::Mode;
use support::*;

fn python_with_openai() -> PathBuf {
    if let Some(p) = std::env::var_os("ANTEROOM_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let python = venv.join("bin").join("python");
    let has_openai = |py: &PathBuf| {
        Command::new(py)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_openai(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is needed for the OpenAI SDK test");
        assert!(made.success(), "python3 -m venv failed");
        let pip = Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "openai>=1.40"])
            .status()
            .expect("pip in the new venv");
        assert!(pip.success(), "pip install openai failed");
    }
    assert!(has_openai(&python), "the openai package is not importable");
    python
}

fn run_script(python: &PathBuf, base: &str, mode: &str) -> serde_json::Value {
    run_script_with(python, base, mode, &[])
}

fn run_script_with(python: &PathBuf, base: &str, mode: &str, args: &[&str]) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(format!("{base}/v1"))
        .arg(mode)
        .args(args)
        .output()
        .expect("run the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK script {mode} failed:\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("the script prints JSON")
}

/// Run the SDK script's `mode` (with `args`) against `proxy`, whose one
/// slot is held meanwhile: once the script is ready (its import is slow),
/// a non-streamed request of `busy_tokens` takes the slot, then the script
/// is told to go. What it printed, and whether it exited 0.
async fn run_while_busy(
    python: &PathBuf,
    proxy: &Running,
    mode: &str,
    args: &[&str],
    busy_tokens: usize,
) -> (serde_json::Value, bool) {
    let base = proxy.url();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/openai_client.py");
    let mut child = tokio::process::Command::new(python)
        .arg(script)
        .arg(format!("{base}/v1"))
        .arg(mode)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the SDK script");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
    assert_eq!(ready.unwrap().unwrap().as_deref(), Some("ready"));
    let client = client();
    let busy = tokio::spawn(async move {
        body_bytes(chat(&client, &base, None, "busy", false, busy_tokens).await).await
    });
    wait_until("the slot to be taken", || {
        proxy.scheduler.snapshot().running == 1
    })
    .await;
    stdin.write_all(b"go\n").await.unwrap();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
    let line = line.unwrap().unwrap().unwrap_or_default();
    let status = child.wait().await.unwrap();
    busy.await.unwrap();
    let out = serde_json::from_str(&line).expect("the script prints JSON");
    (out, status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_streams_and_retries_a_429_after_the_advised_delay() {
    trace_init();
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .unwrap();
    let mut cfg = sim_config(Mode::Serial);
    cfg.ttft = Duration::from_millis(100);
    cfg.tokens_per_second = 100.0;
    let sim = sim(cfg).await;
    let proxy = proxy(&sim.url(), |c| {
        c.max_concurrency = 1.into();
        c.max_queue = 0;
    })
    .await;
    let base = proxy.url();

    let (py, b) = (python.clone(), base.clone());
    let basic = tokio::task::spawn_blocking(move || run_script(&py, &b, "basic"))
        .await
        .unwrap();
    assert_eq!(basic["streamed"], "tok0 tok1 tok2 tok3 tok4 ");

    // Teach the proxy the service time (~390 ms), then keep the only slot busy
    // for about that long while the SDK asks.
    let client = client();
    for i in 0..5 {
        body_bytes(chat(&client, &base, None, &format!("warm{i}"), false, 30).await).await;
    }
    let (retry, ok) = run_while_busy(&python, &proxy, "retry", &[], 30).await;
    assert!(ok, "SDK retry run failed: {retry}");
    assert_eq!(retry["seen"][0][0], 429, "{retry}");
    assert_eq!(
        retry["seen"].as_array().unwrap().last().unwrap()[0],
        200,
        "{retry}"
    );
    let advised = retry["advised_s"].as_f64().unwrap();
    assert!(
        advised > 0.1 && advised < 2.0,
        "advice from the measured ~0.4 s service time: {retry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_raises_the_error_event_of_a_stream_cut_short() {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .unwrap();
    let mut cfg = sim_config(Mode::Batch);
    cfg.die_after_tokens = Some(3);
    let sim = sim(cfg).await;
    let proxy = proxy(&sim.url(), |_| {}).await;
    let base = proxy.url();
    let out = tokio::task::spawn_blocking(move || run_script(&python, &base, "stream_error"))
        .await
        .unwrap();
    assert_eq!(out["error"], "APIError", "{out}");
    assert_eq!(out["error_code"], "upstream_stream_error", "{out}");
    assert_eq!(out["streamed"], "tok0 tok1 tok2 ", "{out}");
}

/// A burst of SDK clients, most refused at once: each is told its own time
/// (behind the queue and behind the ones refused before it, spread over a
/// band), so they come back one after another and get in at their first
/// retry instead of colliding again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_burst_of_sdk_clients_comes_back_spread_and_gets_in() {
    trace_init();
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .unwrap();
    let mut cfg = sim_config(Mode::Serial);
    cfg.ttft = Duration::from_millis(60);
    let sim = sim(cfg).await;
    let proxy = proxy(&sim.url(), |c| {
        c.max_concurrency = 1.into();
        c.max_queue = 4;
    })
    .await;
    let base = proxy.url();
    let out =
        tokio::task::spawn_blocking(move || run_script_with(&python, &base, "burst", &["16"]))
            .await
            .unwrap();
    let clients = out["clients"].as_array().unwrap();
    let refused_first: Vec<f64> = clients
        .iter()
        .filter(|c| c[0][0] == 429)
        .map(|c| c[0][1].as_str().unwrap().parse::<f64>().unwrap())
        .collect();
    assert!(
        refused_first.len() >= 8,
        "most of the burst is refused: {out}"
    );
    let refused_again = clients
        .iter()
        .filter(|c| c.as_array().unwrap().iter().filter(|r| r[0] == 429).count() > 1)
        .count();
    assert_eq!(
        refused_again, 0,
        "no client is refused a second time: {out}"
    );
    let (lo, hi) = refused_first
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), &ms| (lo.min(ms), hi.max(ms)));
    assert!(
        hi - lo >= 60.0 * (refused_first.len() as f64 - 1.0) * 0.8,
        "the advice spreads the burst over its turns: {out}"
    );
}

/// `queue_keepalive` through the real SDK: a stream that waits in the
/// queue gets its head early and comments while it waits; the SDK skips
/// the comments and yields the tokens, and raises the error event when the
/// wait runs out after the head came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_skips_keepalive_comments_and_raises_a_late_refusal() {
    trace_init();
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .unwrap();
    let mut cfg = sim_config(Mode::Serial);
    cfg.ttft = Duration::from_millis(100);
    cfg.tokens_per_second = 100.0;
    let sim = sim(cfg).await;
    let proxy = proxy(&sim.url(), |c| {
        c.max_concurrency = 1.into();
        c.queue_keepalive = "200ms".into();
        c.queue_timeout = "1500ms".into();
    })
    .await;
    // The slot is held for 0.1 s + 69 × 10 ms ≈ 0.8 s (the SDK's stream
    // gets in), then for ≈ 3.1 s (its wait runs out at 1.5 s).
    for (busy_tokens, expect) in [(70, "stream"), (300, "timeout")] {
        let (out, ok) = run_while_busy(&python, &proxy, "keepalive", &[expect], busy_tokens).await;
        assert!(ok, "SDK keepalive run ({expect}) failed: {out}");
    }
    let metrics = metrics_text(&proxy).await;
    assert!(
        metrics.contains("anteroom_queue_keepalive_streams_total 2"),
        "{metrics}"
    );
}
