//! The shipped Grafana dashboard and Prometheus config: every query names
//! only metrics anteroom exports, and each parses as PromQL.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anteroom::telemetry::Metrics;

pub fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

/// Every PromQL expression in the dashboard: panel targets and variable
/// queries.
pub fn expressions() -> Vec<String> {
    let text = std::fs::read_to_string(deploy("grafana-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            out.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(d) = v["definition"].as_str() {
            out.push(d.to_owned());
        }
    }
    out
}

/// `anteroom_…` identifiers in an expression.
fn metric_names(expr: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("anteroom_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(&tail[..end]);
        rest = &tail[end..];
    }
    names
}

#[test]
fn dashboard_queries_use_only_exported_metrics() {
    let metrics = Metrics::new();
    let exported: BTreeSet<&str> = metrics.names().iter().map(String::as_str).collect();
    assert!(exported.contains("anteroom_request_queue_time_seconds"));
    let mut used = BTreeSet::new();
    for expr in expressions() {
        let names = metric_names(&expr);
        assert!(
            !names.is_empty(),
            "a query without an anteroom metric: {expr}"
        );
        for name in names {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| exported.contains(b)))
                .unwrap_or(name);
            assert!(
                exported.contains(base),
                "the dashboard queries `{name}`, which anteroom does not export: {expr}"
            );
            used.insert(base.to_owned());
        }
    }
    // What a person needs to look at is there.
    for needed in [
        "anteroom_num_requests_waiting",
        "anteroom_num_requests_running",
        "anteroom_request_queue_time_seconds",
        "anteroom_backend_time_to_first_token_seconds",
        "anteroom_time_per_output_token_seconds",
        "anteroom_generation_tokens_total",
        "anteroom_request_rejections_total",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
}

/// Each query with Grafana's variables filled in, as Prometheus would run
/// it (`label_values(…)` is Grafana's, not PromQL: the metric it reads).
pub fn as_promql(expr: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", "5m")
        .replace("$instance", ".*");
    if expr.starts_with("label_values(") {
        metric_names(&expr)[0].to_owned()
    } else {
        expr
    }
}

/// Every query parses as PromQL (the parser Prometheus-compatible Rust
/// servers use); promtool checks them again in tier 2.
#[test]
fn the_queries_are_promql() {
    let queries = expressions();
    assert!(queries.len() >= 8, "{queries:?}");
    for expr in &queries {
        let q = as_promql(expr);
        if let Err(e) = promql_parser::parser::parse(&q) {
            panic!("not PromQL: {q}\n{e}");
        }
    }
    // And the check is one that can fail.
    assert!(promql_parser::parser::parse("rate(anteroom_requests_total[5m]").is_err());
    assert!(promql_parser::parser::parse("sum by (le (x)").is_err());
}
