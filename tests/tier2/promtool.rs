//! Prometheus's own linter on what anteroom exports and ships.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::dashboard::{as_promql, deploy, expressions};
use crate::support::*;

fn promtool(args: &[String], stdin: Option<&str>) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (.ci/run installs Debian's prometheus package)");
    let input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        let mut input = input;
        input.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_queries_and_the_scrape_config() {
    // Each query as a recording rule.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in expressions().iter().enumerate() {
        rules += &format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&as_promql(expr)).unwrap()
        );
    }
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-rules.yml");
    std::fs::write(&path, rules).unwrap();
    promtool(
        &["check".into(), "rules".into(), path.display().to_string()],
        None,
    );
    promtool(
        &[
            "check".into(),
            "config".into(),
            deploy("prometheus.yml").display().to_string(),
        ],
        None,
    );
}

#[tokio::test]
async fn promtool_accepts_the_metrics() {
    let (_sim, proxy) = proxy_after_mixed_priorities().await;
    let text = metrics_text(&proxy).await;
    assert!(text.contains("anteroom_requests_total"), "{text}");
    promtool(&["check".into(), "metrics".into()], Some(&text));
}
