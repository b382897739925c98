//! `anteroom report`: the summary a benchmark user wants, from a request log.
//!
//! The log is streamed line by line (one reused buffer; each line parsed into
//! a struct that borrows from it and skips the fields the report does not
//! use), so a log of a million lines takes a second or two and little
//! memory besides the latency samples. Lines that are not records are
//! counted and reported, never fatal.
//!
//! Counted: admitted requests (records with a `priority`); requests that
//! passed through without admission (`GET /v1/models`, …) are only counted
//! in `passed_through`. Latency figures are over the requests that
//! succeeded; rejected, failed and cancelled ones are counted, not timed.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{self, BufRead};

use serde::{Deserialize, Serialize};

use crate::telemetry::Outcome;

/// How requests are grouped besides the overall line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    /// By admission priority.
    Priority,
    /// By the body's `model`.
    Model,
    /// By tenant (API key name, else client address).
    Tenant,
    /// By the upstream that answered.
    Upstream,
}

/// The part of a record the report reads.
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    received: Cow<'a, str>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    priority: Option<i32>,
    #[serde(borrow, default)]
    tenant: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    client: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    upstream: Option<Cow<'a, str>>,
    outcome: Outcome,
    #[serde(default)]
    queue_ms: Option<f64>,
    #[serde(default)]
    ttft_ms: Option<f64>,
    #[serde(default)]
    backend_ttft_ms: Option<f64>,
    #[serde(default)]
    backend_prompt_ms: Option<f64>,
    #[serde(default)]
    backend_wait_ms: Option<f64>,
    #[serde(default)]
    tpot_ms: Option<f64>,
    #[serde(default)]
    e2e_ms: Option<f64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    preemptions: u32,
    #[serde(default)]
    preempted_ms: f64,
}

/// Mean and percentiles of one latency, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Samples.
    pub n: usize,
    /// Mean.
    pub mean: Option<f64>,
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
}

impl Summary {
    fn of(mut v: Vec<f32>) -> Self {
        let n = v.len();
        if n == 0 {
            return Self::default();
        }
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        v.sort_unstable_by(f32::total_cmp);
        let pct = |q: f64| {
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            Some(f64::from(v[i]))
        };
        Self {
            n,
            mean: Some(mean),
            p50: pct(0.5),
            p90: pct(0.9),
            p99: pct(0.99),
        }
    }
}

/// One line of the report: all requests, or one group.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Group {
    /// Requests.
    pub requests: u64,
    /// Succeeded (`ok`).
    pub succeeded: u64,
    /// Failed: an error status or a cut stream.
    pub failed: u64,
    /// Turned away by anteroom (429 / 503).
    pub rejected: u64,
    /// Abandoned by their client.
    pub cancelled: u64,
    /// succeeded / requests.
    pub success_rate: f64,
    /// Requests per minute over the log's span.
    pub requests_per_minute: f64,
    /// Output tokens of successful requests per second over the log's
    /// span (wall time: idle gaps between runs count).
    pub output_tokens_per_second: f64,
    /// Seconds during which at least one of these requests was at the
    /// upstream (the union of their dispatch → last byte intervals).
    pub busy_seconds: f64,
    /// Output tokens of successful requests per second of busy time: the
    /// rate while work was running, idle gaps left out.
    pub output_tokens_per_busy_second: f64,
    /// Output tokens of successful requests.
    pub output_tokens: u64,
    /// Times these requests were preempted (`preempt`).
    pub preemptions: u64,
    /// Backend time of their preempted attempts, thrown away, in seconds.
    pub wasted_backend_seconds: f64,
    /// Arrival → dispatch.
    pub queue_ms: Summary,
    /// Arrival → first token at the client.
    pub ttft_ms: Summary,
    /// Dispatch → first token.
    pub backend_ttft_ms: Summary,
    /// The backend's own prefill time, where it reports it.
    pub backend_prompt_ms: Summary,
    /// Time waited inside the backend, where it reports its timings.
    pub backend_wait_ms: Summary,
    /// Time per output token.
    pub tpot_ms: Summary,
    /// Dispatch → last byte (end-to-end minus queue wait and any
    /// preempted attempts): the model's time for the answer the client
    /// got, for every request, streamed or not.
    pub model_ms: Summary,
    /// Arrival → last byte.
    pub e2e_ms: Summary,
}

/// The whole report.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// Lines read.
    pub lines: u64,
    /// Lines that were not records.
    pub malformed_lines: u64,
    /// Records of requests that bypassed admission (not in the figures).
    pub passed_through: u64,
    /// First arrival to last completion, seconds.
    pub span_seconds: f64,
    /// All admitted requests.
    pub all: Group,
    /// By the chosen key, if any.
    pub by: Option<BTreeMap<String, Group>>,
}

#[derive(Default)]
struct Acc {
    requests: u64,
    succeeded: u64,
    failed: u64,
    rejected: u64,
    cancelled: u64,
    output_tokens: u64,
    preemptions: u64,
    wasted_ms: f64,
    queue: Vec<f32>,
    ttft: Vec<f32>,
    backend_ttft: Vec<f32>,
    backend_prompt: Vec<f32>,
    backend_wait: Vec<f32>,
    tpot: Vec<f32>,
    model: Vec<f32>,
    e2e: Vec<f32>,
    /// Dispatch → last byte of each request that ran (its last attempt,
    /// if it was preempted: where the others ran is not logged), in ms
    /// since the epoch.
    ran: Vec<(f64, f64)>,
}

impl Acc {
    fn add(&mut self, l: &Line<'_>, at: f64) {
        self.requests += 1;
        self.preemptions += u64::from(l.preemptions);
        self.wasted_ms += l.preempted_ms;
        // The last dispatch: after the waits and the preempted attempts.
        let dispatched = l.queue_ms.map(|q| q + l.preempted_ms);
        if let (Some(d), Some(e)) = (dispatched, l.e2e_ms) {
            if l.outcome != Outcome::Rejected && e > d {
                self.ran.push((at + d, at + e));
            }
        }
        match l.outcome {
            Outcome::Ok => self.succeeded += 1,
            Outcome::Rejected => self.rejected += 1,
            Outcome::Cancelled => self.cancelled += 1,
            Outcome::Error | Outcome::Truncated => self.failed += 1,
        }
        if l.outcome != Outcome::Ok {
            return;
        }
        self.output_tokens += l.completion_tokens.unwrap_or(0);
        for (v, x) in [
            (&mut self.queue, l.queue_ms),
            (&mut self.ttft, l.ttft_ms),
            (&mut self.backend_ttft, l.backend_ttft_ms),
            (&mut self.backend_prompt, l.backend_prompt_ms),
            (&mut self.backend_wait, l.backend_wait_ms),
            (&mut self.tpot, l.tpot_ms),
            (
                &mut self.model,
                l.e2e_ms.zip(dispatched).map(|(e, d)| e - d),
            ),
            (&mut self.e2e, l.e2e_ms),
        ] {
            if let Some(x) = x {
                v.push(x as f32);
            }
        }
    }

    fn finish(self, span: f64) -> Group {
        let per_sec = |n: u64| if span > 0.0 { n as f64 / span } else { 0.0 };
        let busy = union_ms(self.ran) / 1000.0;
        Group {
            requests: self.requests,
            succeeded: self.succeeded,
            failed: self.failed,
            rejected: self.rejected,
            cancelled: self.cancelled,
            success_rate: if self.requests > 0 {
                self.succeeded as f64 / self.requests as f64
            } else {
                0.0
            },
            requests_per_minute: per_sec(self.requests) * 60.0,
            output_tokens_per_second: per_sec(self.output_tokens),
            busy_seconds: busy,
            output_tokens_per_busy_second: if busy > 0.0 {
                self.output_tokens as f64 / busy
            } else {
                0.0
            },
            output_tokens: self.output_tokens,
            preemptions: self.preemptions,
            wasted_backend_seconds: self.wasted_ms / 1000.0,
            queue_ms: Summary::of(self.queue),
            ttft_ms: Summary::of(self.ttft),
            backend_ttft_ms: Summary::of(self.backend_ttft),
            backend_prompt_ms: Summary::of(self.backend_prompt),
            backend_wait_ms: Summary::of(self.backend_wait),
            tpot_ms: Summary::of(self.tpot),
            model_ms: Summary::of(self.model),
            e2e_ms: Summary::of(self.e2e),
        }
    }
}

/// The length of the union of `intervals` (start, end).
fn union_ms(mut intervals: Vec<(f64, f64)>) -> f64 {
    intervals.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut run: Option<(f64, f64)> = None;
    for (start, end) in intervals {
        run = match run {
            Some((s, e)) if start <= e => Some((s, e.max(end))),
            Some((s, e)) => {
                total += e - s;
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    total + run.map_or(0.0, |(s, e)| e - s)
}

/// Read a request log and summarise it.
pub fn read(input: impl BufRead, by: Option<GroupBy>) -> io::Result<Report> {
    let mut input = input;
    let mut buf = Vec::with_capacity(1024);
    let mut report = Report::default();
    let mut all = Acc::default();
    let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
    let (mut first, mut last) = (f64::INFINITY, f64::NEG_INFINITY);
    loop {
        buf.clear();
        if input.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        let line = buf.trim_ascii();
        if line.is_empty() {
            continue;
        }
        report.lines += 1;
        let Ok(l) = serde_json::from_slice::<Line<'_>>(line) else {
            report.malformed_lines += 1;
            continue;
        };
        let Some(at) = parse_rfc3339_ms(&l.received) else {
            report.malformed_lines += 1;
            continue;
        };
        first = first.min(at);
        last = last.max(at + l.e2e_ms.unwrap_or(0.0));
        let Some(priority) = l.priority else {
            report.passed_through += 1;
            continue;
        };
        all.add(&l, at);
        if let Some(by) = by {
            let key = match by {
                GroupBy::Priority => priority.to_string(),
                GroupBy::Model => l.model.as_deref().unwrap_or("-").to_owned(),
                GroupBy::Tenant => l
                    .tenant
                    .as_deref()
                    .or(l.client.as_deref())
                    .unwrap_or("-")
                    .to_owned(),
                GroupBy::Upstream => l.upstream.as_deref().unwrap_or("-").to_owned(),
            };
            match groups.get_mut(&key) {
                Some(acc) => acc.add(&l, at),
                None => groups.entry(key).or_default().add(&l, at),
            }
        }
    }
    let span = if last > first {
        (last - first) / 1000.0
    } else {
        0.0
    };
    report.span_seconds = span;
    report.all = all.finish(span);
    report.by = by.map(|_| {
        groups
            .into_iter()
            .map(|(k, acc)| (k, acc.finish(span)))
            .collect()
    });
    Ok(report)
}

/// Milliseconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
fn parse_rfc3339_ms(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Milliseconds from the fraction's first three digits.
    let mut frac_ms = 0;
    if b.get(19) == Some(&b'.') {
        let digits = b.get(20..b.len() - 1)?;
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        for i in 0..3 {
            frac_ms = frac_ms * 10 + digits.get(i).map_or(0, |d| i64::from(d - b'0'));
        }
    }
    let days = days_from_civil(y, m, d);
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000 + frac_ms) as f64)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The report as text tables, in the manner of lm-evaluation-harness's
/// final summary.
pub fn render(report: &Report, source: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "anteroom report: {source}: {} lines, {} malformed, {} passed through unadmitted, span {:.1} s\n",
        report.lines, report.malformed_lines, report.passed_through, report.span_seconds
    );
    let mut rows: Vec<(&str, &Group)> = vec![("all", &report.all)];
    if let Some(by) = &report.by {
        rows.extend(by.iter().map(|(k, g)| (k.as_str(), g)));
    }
    let _ = writeln!(
        out,
        "| group | requests | succeeded | failed | rejected | cancelled | success | req/min | out tok/s (wall) | busy s | out tok/s (busy) |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (name, g) in &rows {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {:.1}% | {:.1} | {:.1} | {:.1} | {:.1} |",
            g.requests,
            g.succeeded,
            g.failed,
            g.rejected,
            g.cancelled,
            g.success_rate * 100.0,
            g.requests_per_minute,
            g.output_tokens_per_second,
            g.busy_seconds,
            g.output_tokens_per_busy_second
        );
    }
    let _ = writeln!(
        out,
        "\nout tok/s (wall): over the log's span; busy s: the time at least one \
         request was at the upstream; out tok/s (busy): over that time."
    );
    if report.all.preemptions > 0 {
        let _ = writeln!(
            out,
            "\nPreempted (their attempts' backend time thrown away; busy s counts only the attempts that answered):\n"
        );
        let _ = writeln!(out, "| group | preemptions | wasted backend s |");
        let _ = writeln!(out, "|---|--:|--:|");
        for (name, g) in &rows {
            let _ = writeln!(
                out,
                "| {name} | {} | {:.1} |",
                g.preemptions, g.wasted_backend_seconds
            );
        }
    }
    let _ = writeln!(out, "\nLatency of succeeded requests, milliseconds:\n");
    let _ = writeln!(out, "| group | metric | n | mean | p50 | p90 | p99 |");
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|");
    let f = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    for (name, g) in &rows {
        for (metric, s) in [
            ("queue wait", &g.queue_ms),
            ("TTFT", &g.ttft_ms),
            ("backend TTFT", &g.backend_ttft_ms),
            ("backend prefill", &g.backend_prompt_ms),
            ("backend wait", &g.backend_wait_ms),
            ("TPOT", &g.tpot_ms),
            ("model time", &g.model_ms),
            ("end-to-end", &g.e2e_ms),
        ] {
            if s.n == 0 && metric.starts_with("backend ") && metric != "backend TTFT" {
                // Only backends that report their timings have these.
                continue;
            }
            let _ = writeln!(
                out,
                "| {name} | {metric} | {} | {} | {} | {} | {} |",
                s.n,
                f(s.mean),
                f(s.p50),
                f(s.p90),
                f(s.p99)
            );
        }
    }
    out
}

/// Runs side by side (`anteroom report A.jsonl B.jsonl …`): the figures
/// that compare models or settings under the same load, each run's, and
/// each later run's difference from the first.
pub fn compare(runs: &[(String, Report)]) -> String {
    use std::fmt::Write as _;
    let mut out =
        String::from("Runs side by side (all admitted requests; Δ: against the first):\n\n");
    let _ = write!(out, "| figure |");
    for (i, (name, _)) in runs.iter().enumerate() {
        let _ = write!(out, " {name} |");
        if i > 0 {
            let _ = write!(out, " Δ |");
        }
    }
    let _ = write!(out, "\n|---|");
    for i in 0..runs.len() {
        let _ = write!(out, "--:|{}", if i > 0 { "--:|" } else { "" });
    }
    out.push('\n');
    type Figure = fn(&Group) -> Option<f64>;
    let figures: [(&str, Figure); 15] = [
        ("requests", |g| Some(g.requests as f64)),
        ("success %", |g| Some(g.success_rate * 100.0)),
        ("req/min", |g| Some(g.requests_per_minute)),
        ("out tok/s (wall)", |g| Some(g.output_tokens_per_second)),
        ("out tok/s (busy)", |g| {
            Some(g.output_tokens_per_busy_second)
        }),
        ("TTFT mean ms", |g| g.ttft_ms.mean),
        ("TTFT p50 ms", |g| g.ttft_ms.p50),
        ("TTFT p90 ms", |g| g.ttft_ms.p90),
        ("TTFT p99 ms", |g| g.ttft_ms.p99),
        ("queue wait p50 ms", |g| g.queue_ms.p50),
        ("model time p50 ms", |g| g.model_ms.p50),
        ("model time p90 ms", |g| g.model_ms.p90),
        ("TPOT p50 ms", |g| g.tpot_ms.p50),
        ("end-to-end p50 ms", |g| g.e2e_ms.p50),
        ("wasted backend s", |g| Some(g.wasted_backend_seconds)),
    ];
    let f = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    for (figure, of) in figures {
        let first = of(&runs[0].1.all);
        let _ = write!(out, "| {figure} |");
        for (i, (_, r)) in runs.iter().enumerate() {
            let v = of(&r.all);
            let _ = write!(out, " {} |", f(v));
            if i > 0 {
                let delta = match (first, v) {
                    (Some(a), Some(b)) if a != 0.0 => format!("{:+.1}%", (b - a) / a * 100.0),
                    _ => "-".to_owned(),
                };
                let _ = write!(out, " {delta} |");
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(priority: Option<i32>, outcome: &str, received: &str, queue: f64, e2e: f64) -> String {
        serde_json::json!({
            "request_id": "x", "received": received, "method": "POST", "path": "/v1/chat/completions",
            "model": "m", "priority": priority, "client": "127.0.0.1", "stream": true, "status": 200,
            "error": null, "outcome": outcome, "queue_ms": queue, "upstream_headers_ms": 1.0,
            "ttft_ms": queue + 10.0, "backend_ttft_ms": 10.0, "e2e_ms": e2e, "tpot_ms": 2.0,
            "completion_tokens": 5, "tokens_from": "counted", "malformed": false
        })
        .to_string()
    }

    #[test]
    fn busy_time_is_the_union_of_what_ran() {
        assert_eq!(union_ms(vec![]), 0.0);
        // Overlapping, touching, nested, apart, in any order.
        let v = vec![
            (10.0, 20.0),
            (0.0, 5.0),
            (15.0, 30.0),
            (30.0, 31.0),
            (40.0, 50.0),
            (41.0, 42.0),
        ];
        assert_eq!(union_ms(v), 5.0 + 21.0 + 10.0);
    }

    #[test]
    fn counts_percentiles_and_rates() {
        let mut log = String::new();
        for i in 0..100 {
            log += &line(
                Some(i % 2),
                "ok",
                "2026-11-27T10:00:00.000Z",
                i as f64,
                1000.0,
            );
            log.push('\n');
        }
        log += &line(Some(0), "rejected", "2026-11-27T10:00:59.000Z", 0.0, 0.5);
        log += "\n";
        log += &line(None, "ok", "2026-11-27T10:00:30.000Z", 0.0, 1.0);
        log += "\nnot json\n{\"half\":\n";
        let r = read(log.as_bytes(), Some(GroupBy::Priority)).unwrap();
        assert_eq!(r.lines, 104);
        assert_eq!(r.malformed_lines, 2);
        assert_eq!(r.passed_through, 1);
        assert_eq!(r.all.requests, 101);
        assert_eq!(r.all.succeeded, 100);
        assert_eq!(r.all.rejected, 1);
        assert!(
            (r.span_seconds - 59.0005).abs() < 1e-6,
            "{}",
            r.span_seconds
        );
        assert_eq!(r.all.queue_ms.n, 100);
        assert_eq!(r.all.queue_ms.p50, Some(49.0));
        assert_eq!(r.all.queue_ms.p90, Some(89.0));
        assert_eq!(r.all.queue_ms.p99, Some(98.0));
        assert_eq!(r.all.queue_ms.mean, Some(49.5));
        // The model's time: end-to-end (1000) minus each one's queue wait.
        assert_eq!(r.all.model_ms.n, 100);
        assert_eq!(r.all.model_ms.p50, Some(950.0));
        assert_eq!(r.all.model_ms.mean, Some(950.5));
        assert_eq!(r.all.output_tokens, 500);
        let by = r.by.as_ref().unwrap();
        assert_eq!(by["0"].requests, 51);
        assert_eq!(by["1"].requests, 50);
        let text = render(&r, "t.jsonl");
        assert!(
            text.contains("| all | 101 | 100 | 0 | 1 | 0 | 99.0% |"),
            "{text}"
        );
    }

    #[test]
    fn preempted_attempts_are_wasted_time_not_model_time() {
        let mut log = String::new();
        for (priority, preempted) in [(10, 700.0), (10, 0.0), (0, 0.0)] {
            let mut v: serde_json::Value = serde_json::from_str(&line(
                Some(priority),
                "ok",
                "2026-11-27T10:00:00.000Z",
                100.0,
                1000.0,
            ))
            .unwrap();
            if preempted > 0.0 {
                v["preemptions"] = 2.into();
                v["preempted_ms"] = preempted.into();
            }
            log += &v.to_string();
            log.push('\n');
        }
        let r = read(log.as_bytes(), Some(GroupBy::Priority)).unwrap();
        let by = r.by.as_ref().unwrap();
        assert_eq!(by["10"].preemptions, 2);
        assert!((by["10"].wasted_backend_seconds - 0.7).abs() < 1e-9);
        assert_eq!(by["0"].preemptions, 0);
        // Its answer took 1000 − 100 − 700 ms at the backend.
        assert_eq!(by["10"].model_ms.p50, Some(200.0));
        assert_eq!(by["0"].model_ms.p50, Some(900.0));
        // Busy: the answered attempts, 900 ms at most (they overlap).
        assert!((r.all.busy_seconds - 0.9).abs() < 1e-9);
        let text = render(&r, "t.jsonl");
        assert!(text.contains("| 10 | 2 | 0.7 |"), "{text}");
        assert!(!render(
            &read(
                line(Some(0), "ok", "2026-11-27T10:00:00.000Z", 1.0, 2.0).as_bytes(),
                None
            )
            .unwrap(),
            "t"
        )
        .contains("Preempted"));
    }

    #[test]
    fn groups_by_the_upstream_that_answered() {
        let mut log = String::new();
        for (i, upstream) in ["vllm", "llama", "vllm", "", "vllm"].iter().enumerate() {
            let mut v: serde_json::Value = serde_json::from_str(&line(
                Some(0),
                "ok",
                "2026-11-27T10:00:00.000Z",
                0.0,
                10.0 * (i + 1) as f64,
            ))
            .unwrap();
            // An older log has no `upstream`; a rejected request has null.
            if !upstream.is_empty() {
                v["upstream"] = (*upstream).into();
            }
            log += &v.to_string();
            log.push('\n');
        }
        let r = read(log.as_bytes(), Some(GroupBy::Upstream)).unwrap();
        let by = r.by.as_ref().unwrap();
        assert_eq!(by.len(), 3, "{:?}", by.keys());
        assert_eq!(by["vllm"].requests, 3);
        assert_eq!(by["llama"].requests, 1);
        assert_eq!(by["llama"].e2e_ms.p50, Some(20.0));
        assert_eq!(by["-"].requests, 1);
    }

    #[test]
    fn timestamps_parse() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00.000Z"), Some(0.0));
        assert_eq!(
            parse_rfc3339_ms("2026-11-27T21:05:03.123Z"),
            Some(1_795_813_503_123.0)
        );
        assert_eq!(
            parse_rfc3339_ms("2000-02-29T00:00:00Z"),
            Some(951_782_400_000.0)
        );
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }
}
