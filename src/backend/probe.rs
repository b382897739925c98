//! `anteroom probe URL`: the connection test before a benchmark. What the
//! backend is, what it serves, how its answers look, and the settings
//! anteroom would use in front of it.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Serialize;

use super::{watch::identify, Reading};
use crate::config::backend::{Kind, Setting};
use crate::origin::Origin;

/// How long one probe request may take (a real model answering 8 tokens).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The most of an answer read.
const MAX_ANSWER: usize = 4 << 20;

/// What one test request showed.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Answer {
    /// Its status.
    pub status: u16,
    /// It carried `usage` (for a stream, with `stream_options.include_usage`).
    pub usage: bool,
    /// It carried llama.cpp's `timings`.
    pub timings: bool,
    /// A stream: `data:` events seen, and whether it ended with `[DONE]`.
    pub events: Option<usize>,
    /// A stream ended with `data: [DONE]`.
    pub done: Option<bool>,
    /// The error message, when it failed.
    pub error: Option<String>,
}

/// Everything `anteroom probe` found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The URL probed.
    pub url: String,
    /// What it is (`null`: it could not be reached).
    pub kind: Option<&'static str>,
    /// Its version, where it says.
    pub version: Option<String>,
    /// Slots it reports.
    pub slots: Option<usize>,
    /// Running and waiting inside it now, where it reports them.
    pub running: Option<usize>,
    /// Waiting inside it now.
    pub waiting: Option<usize>,
    /// Where its load is read (`/metrics`, `/slots`).
    pub load_path: Option<&'static str>,
    /// The models `GET /v1/models` lists.
    pub models: Vec<String>,
    /// The model the test requests asked for.
    pub model: Option<String>,
    /// A non-streamed chat completion.
    pub plain: Option<Answer>,
    /// A streamed one, asking for usage.
    pub stream: Option<Answer>,
    /// A request with `"priority": 1`: accepted (`true`), refused as
    /// unsupported (`false`: vLLM without `--scheduling-policy priority`).
    pub priority_accepted: Option<bool>,
    /// What went wrong, if anything.
    pub problems: Vec<String>,
    /// The config anteroom would use, as TOML lines.
    pub suggested: Vec<String>,
}

async fn chat(origin: &Origin, model: &str, stream: bool, priority: Option<i32>) -> Answer {
    let mut body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    if let Some(p) = priority {
        body["priority"] = p.into();
    }
    let sent = crate::upstream::exchange(
        origin,
        Method::POST,
        "/v1/chat/completions",
        Some(Bytes::from(body.to_string())),
        REQUEST_TIMEOUT,
        MAX_ANSWER,
    )
    .await;
    let (status, bytes) = match sent {
        Ok(x) => x,
        Err(e) => {
            return Answer {
                error: Some(e.to_string()),
                ..Answer::default()
            }
        }
    };
    let mut a = Answer {
        status: status.as_u16(),
        ..Answer::default()
    };
    let text = String::from_utf8_lossy(&bytes);
    let has = |v: &serde_json::Value, key: &str| v.get(key).is_some_and(|x| !x.is_null());
    if status != StatusCode::OK {
        a.error = Some(
            serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| {
                    v.pointer("/error/message")
                        .and_then(|m| m.as_str())
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| text.chars().take(200).collect()),
        );
    } else if stream {
        let mut events = 0;
        let mut done = false;
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                continue;
            };
            events += 1;
            if data == "[DONE]" {
                done = true;
                continue;
            }
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(data) {
                a.usage |= has(&v, "usage");
                a.timings |= has(&v, "timings");
                if let Some(m) = v.pointer("/error/message").and_then(|m| m.as_str()) {
                    a.error = Some(m.to_owned());
                }
            }
        }
        a.events = Some(events);
        a.done = Some(done);
    } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        a.usage = has(&v, "usage");
        a.timings = has(&v, "timings");
    }
    a
}

/// The settings anteroom would use in front of this backend.
fn suggest(r: &Reading, url: &str) -> Vec<String> {
    let mut out = vec![format!("upstream = \"{url}\"")];
    let Some(kind) = r.kind else {
        out.push(
            "max_concurrency = \"auto\"    # nothing answered: probe again once it runs".into(),
        );
        return out;
    };
    out.push(format!("backend = \"{kind}\""));
    out.push(match (kind, r.slots) {
        (_, Some(n)) => format!(
            "max_concurrency = \"backend\"    # {n} slot{} now; followed when it restarts",
            if n == 1 { "" } else { "s" }
        ),
        (Kind::Vllm, None) => {
            "max_concurrency = 32    # below vLLM's max_num_seqs; or \"auto\"".to_owned()
        }
        (Kind::LmStudio, None) => {
            "max_concurrency = 4    # LM Studio's default concurrent predictions per model"
                .to_owned()
        }
        (Kind::Ollama, None) => {
            "max_concurrency = 4    # OLLAMA_NUM_PARALLEL (Ollama picks 1 or 4 itself when unset)"
                .to_owned()
        }
        _ => "max_concurrency = \"auto\"    # it reports no slots".to_owned(),
    });
    out
}

/// Probe the backend at `url`; `model` for the test requests (else the
/// first it lists). Nothing here fails: what went wrong is in the report.
pub async fn probe(url: &str, model: Option<&str>) -> Result<Report, String> {
    let origin = Origin::parse(url)?;
    let mut problems = Vec::new();
    let reading = match identify(&origin, Setting::Auto).await {
        Ok(r) => r,
        Err(e) => {
            problems.push(format!("could not reach it: {e}"));
            Reading::default()
        }
    };
    if let Some(p) = &reading.problem {
        problems.push(p.clone());
    }
    let mut report = Report {
        url: url.to_owned(),
        kind: reading.kind.map(Kind::as_str),
        version: reading.version.clone(),
        slots: reading.slots,
        running: reading.running,
        waiting: reading.waiting,
        load_path: reading.load_path,
        models: Vec::new(),
        model: None,
        plain: None,
        stream: None,
        priority_accepted: None,
        problems,
        suggested: suggest(&reading, url),
    };
    if reading.kind.is_none() {
        return Ok(report);
    }
    match crate::upstream::get(
        &origin,
        "/v1/models",
        super::PROBE_TIMEOUT,
        super::PROBE_MAX_BYTES,
    )
    .await
    {
        Ok((StatusCode::OK, body)) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            report.models = v["data"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect();
        }
        Ok((status, _)) => report.problems.push(format!("GET /v1/models: {status}")),
        Err(e) => report.problems.push(format!("GET /v1/models: {e}")),
    }
    let Some(model) = model
        .map(str::to_owned)
        .or_else(|| report.models.first().cloned())
    else {
        report
            .problems
            .push("no model to test with (none listed; give --model)".into());
        return Ok(report);
    };
    report.plain = Some(chat(&origin, &model, false, None).await);
    report.stream = Some(chat(&origin, &model, true, None).await);
    let with_priority = chat(&origin, &model, false, Some(1)).await;
    report.priority_accepted = match with_priority.status {
        200 => Some(true),
        400 if with_priority
            .error
            .as_deref()
            .is_some_and(|e| e.to_ascii_lowercase().contains("priority")) =>
        {
            Some(false)
        }
        _ => None,
    };
    report.model = Some(model);
    Ok(report)
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or = |v: Option<usize>| v.map_or("not reported".to_owned(), |n| n.to_string());
        writeln!(f, "backend at {}", self.url)?;
        writeln!(f, "  kind:     {}", self.kind.unwrap_or("unreachable"))?;
        if let Some(v) = &self.version {
            writeln!(f, "  version:  {v}")?;
        }
        writeln!(f, "  slots:    {}", or(self.slots))?;
        if let Some(path) = self.load_path {
            writeln!(
                f,
                "  load:     {} running, {} waiting inside it (from {path})",
                or(self.running),
                or(self.waiting)
            )?;
        }
        if !self.models.is_empty() {
            writeln!(f, "  models:   {}", self.models.join(", "))?;
        }
        for (what, a) in [("plain", &self.plain), ("stream", &self.stream)] {
            let Some(a) = a else { continue };
            write!(f, "  {what:<9} status {}", a.status)?;
            if a.status == 200 {
                write!(f, ", usage: {}, timings: {}", yes(a.usage), yes(a.timings))?;
            }
            if let (Some(n), Some(done)) = (a.events, a.done) {
                write!(f, ", {n} events, [DONE]: {}", yes(done))?;
            }
            if let Some(e) = &a.error {
                write!(f, ", error: {e}")?;
            }
            writeln!(f)?;
        }
        if let Some(p) = self.priority_accepted {
            writeln!(
                f,
                "  priority: {}",
                if p {
                    "the request field is accepted (vLLM honours it with --scheduling-policy priority; others ignore it: anteroom's queue orders by it either way)"
                } else {
                    "refused (vLLM without --scheduling-policy priority): anteroom orders by it, the backend never sees it work"
                }
            )?;
        }
        for p in &self.problems {
            writeln!(f, "  problem:  {p}")?;
        }
        writeln!(f, "suggested config:")?;
        for line in &self.suggested {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}
