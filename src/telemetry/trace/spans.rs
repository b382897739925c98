//! A finished request as OTLP spans: one for the request (the OpenTelemetry
//! GenAI conventions where they apply, and anteroom's own attributes), one
//! for each wait in the queue, one for each attempt upstream.
//!
//! Built on the exporter's task from the request's [`Finished`] record, so
//! the request path pays for none of it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span, status, Span, Status};

use super::notes::{Attempt, Ids, TraceNotes, PREEMPTED};
use crate::telemetry::{Finished, Outcome};

/// OTLP span flags: the W3C flags, and whether the parent is remote known.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// `gen_ai.operation.name` of a request path, where it is one.
fn operation(path: &str) -> Option<&'static str> {
    if path.ends_with("/chat/completions") || path.ends_with("/messages") {
        Some("chat")
    } else if path.ends_with("/completions") || path.ends_with("/completion") {
        Some("text_completion")
    } else if path.ends_with("/embeddings") {
        Some("embeddings")
    } else {
        None
    }
}

/// How many spans `f` becomes.
pub(super) fn count(notes: &TraceNotes, f: &Finished) -> u64 {
    let attempts = notes.attempts.lock();
    let waits = usize::from(f.timings.queue_ms.is_some())
        + attempts
            .iter()
            .filter(|a| a.error == Some(PREEMPTED))
            .count();
    (1 + waits + attempts.len()) as u64
}

/// The spans of `f`, appended to `out`.
pub(super) fn build(notes: &TraceNotes, f: &Finished, ids: &Ids, out: &mut Vec<Span>) {
    let start = nanos(f.received);
    let e2e = ms(f.timings.e2e_ms.unwrap_or(0.0));
    let at = |d: Duration| start.saturating_add(d.as_nanos() as u64);
    let end = at(e2e);
    let flags = 1 | HAS_IS_REMOTE | if notes.parent.is_some() { IS_REMOTE } else { 0 };
    let trace_id = notes.trace_id.to_vec();
    let request = notes.span_id.to_vec();
    let path = f.uri.path();
    let classified = f.tap.classified();
    let model = classified.and_then(|c| c.model.as_deref());
    let op = operation(path);

    let mut attrs = Vec::with_capacity(24);
    if let Some(op) = op {
        attrs.push(kv("gen_ai.operation.name", op));
    }
    if let Some(m) = model {
        attrs.push(kv("gen_ai.request.model", m));
    }
    if let Some(n) = classified.and_then(|c| c.max_tokens) {
        attrs.push(kv("gen_ai.request.max_tokens", n));
    }
    let t = &f.timings;
    if let Some(n) = t.prompt_tokens {
        attrs.push(kv("gen_ai.usage.input_tokens", n));
    }
    if let Some(n) = t.completion_tokens {
        attrs.push(kv("gen_ai.usage.output_tokens", n));
    }
    // The semantic conventions' server metrics, in seconds, as attributes
    // of the request they were measured on.
    if let Some(ttft) = t.backend_ttft_ms {
        attrs.push(kv("gen_ai.server.time_to_first_token", ttft / 1000.0));
    }
    if let Some(tpot) = t.tpot_ms {
        attrs.push(kv("gen_ai.server.time_per_output_token", tpot / 1000.0));
    }
    attrs.push(kv("http.request.method", f.method.as_str()));
    attrs.push(kv("url.path", path));
    attrs.push(kv("http.response.status_code", u64::from(f.status)));
    if let Some(ip) = f.client {
        attrs.push(kv("client.address", ip.to_string()));
    }
    if let Some(e) = f.error {
        attrs.push(kv("error.type", e));
    } else if f.status >= 500 {
        attrs.push(kv("error.type", f.status.to_string()));
    }
    if let Some(id) = f.request_id.as_ref().and_then(|v| v.to_str().ok()) {
        attrs.push(kv("anteroom.request_id", id));
    }
    if let Some(p) = f.priority {
        attrs.push(kv("anteroom.priority", i64::from(p)));
    }
    if let Some(tenant) = f.tap.tenant() {
        attrs.push(kv("anteroom.tenant", &**tenant));
    }
    if let Some(up) = f.tap.upstream() {
        attrs.push(kv("anteroom.upstream", &*up));
    }
    if let Some(q) = t.queue_ms {
        attrs.push(kv("anteroom.queue_ms", q));
    }
    if let Some(ttft) = t.ttft_ms {
        attrs.push(kv("anteroom.ttft_ms", ttft));
    }
    attrs.push(kv("anteroom.stream", f.stream));
    attrs.push(kv("anteroom.outcome", f.outcome.as_str()));
    attrs.push(kv(
        "anteroom.upstream_retries",
        u64::from(t.upstream_retries),
    ));
    attrs.push(kv("anteroom.preemptions", u64::from(t.preemptions)));

    let mut events = Vec::new();
    if let Some(ttft) = t.ttft_ms {
        events.push(span::Event {
            time_unix_nano: at(ms(ttft)),
            name: "first_token".into(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
        });
    }
    // A server span is in error for a 5xx (a 4xx is the client's), or a
    // body cut short.
    let failed = f.status >= 500 || f.outcome == Outcome::Truncated;
    out.push(Span {
        trace_id: trace_id.clone(),
        span_id: request.clone(),
        trace_state: notes
            .parent
            .as_ref()
            .and_then(|p| p.state.clone())
            .unwrap_or_default(),
        parent_span_id: notes
            .parent
            .as_ref()
            .map(|p| p.span_id.to_vec())
            .unwrap_or_default(),
        flags,
        name: match (op, model) {
            (Some(op), Some(m)) => format!("{op} {m}"),
            (Some(op), None) => op.to_owned(),
            _ => format!("{} {path}", f.method),
        },
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: end,
        attributes: attrs,
        dropped_attributes_count: 0,
        events,
        dropped_events_count: 0,
        links: Vec::new(),
        dropped_links_count: 0,
        status: Some(match failed {
            true => Status {
                message: f.error.unwrap_or("").to_owned(),
                code: status::StatusCode::Error as i32,
            },
            false => Status::default(),
        }),
    });

    let child =
        |span_id: [u8; 8], name: String, kind: span::SpanKind, from, to, attrs, error| Span {
            trace_id: trace_id.clone(),
            span_id: span_id.to_vec(),
            trace_state: String::new(),
            parent_span_id: request.clone(),
            flags: 1 | HAS_IS_REMOTE,
            name,
            kind: kind as i32,
            start_time_unix_nano: from,
            end_time_unix_nano: to,
            attributes: attrs,
            dropped_attributes_count: 0,
            events: Vec::new(),
            dropped_events_count: 0,
            links: Vec::new(),
            dropped_links_count: 0,
            status: Some(match error {
                Some(e) => Status {
                    message: e,
                    code: status::StatusCode::Error as i32,
                },
                None => Status::default(),
            }),
        };

    // The waits: from arrival to the first attempt, and after each
    // preempted attempt to the next; one never followed by an attempt
    // (refused, abandoned) lasts to the end.
    let attempts = notes.attempts();
    if t.queue_ms.is_some() {
        let mut waits = Vec::new();
        let mut from = Some(Duration::ZERO);
        for a in &attempts {
            if let Some(f0) = from.take() {
                waits.push((f0, a.start, false));
            }
            if a.error == Some(PREEMPTED) {
                from = a.end;
            }
        }
        if let Some(f0) = from {
            waits.push((f0, e2e, true));
        }
        for (i, (from, to, last)) in waits.into_iter().enumerate() {
            let mut a = vec![kv("anteroom.priority", i64::from(f.priority.unwrap_or(0)))];
            if i > 0 {
                a.push(kv("anteroom.after_preemption", i as i64));
            }
            if last {
                a.push(kv("anteroom.outcome", f.outcome.as_str()));
            }
            let error = (last && f.outcome == Outcome::Rejected)
                .then(|| f.error.unwrap_or("rejected").to_owned());
            out.push(child(
                ids.span_id(),
                "queue".into(),
                span::SpanKind::Internal,
                at(from),
                at(to),
                a,
                error,
            ));
        }
    }

    // The attempts upstream: the client's answer's runs to the request's
    // end; the others end with their answer's headers, their failure, or
    // their preemption.
    let last = attempts.len().saturating_sub(1);
    for (i, a) in attempts.iter().enumerate() {
        let Attempt {
            span_id,
            start: from,
            end: to,
            status,
            error,
        } = *a;
        let to = match (i == last, error) {
            (true, None) => e2e,
            _ => to.unwrap_or(e2e),
        };
        let mut attrs = vec![
            kv("http.request.method", f.method.as_str()),
            kv("url.path", path),
            kv("anteroom.attempt", (i + 1) as i64),
        ];
        if let Some(up) = f.tap.upstream() {
            attrs.push(kv("anteroom.upstream", &*up));
        }
        if let Some(s) = status {
            attrs.push(kv("http.response.status_code", u64::from(s)));
        }
        let error = match (error, status) {
            (Some(e), _) => Some(e.to_owned()),
            (None, Some(s)) if s >= 400 => Some(s.to_string()),
            _ => None,
        };
        if let Some(e) = &error {
            attrs.push(kv("error.type", e.as_str()));
        }
        out.push(child(
            span_id,
            format!("{} {path}", f.method),
            span::SpanKind::Client,
            at(from),
            at(to),
            attrs,
            error,
        ));
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .min(u128::from(u64::MAX)) as u64
}

fn ms(v: f64) -> Duration {
    Duration::try_from_secs_f64(v / 1000.0).unwrap_or_default()
}

/// An attribute.
fn kv(key: &str, value: impl Into<Value>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        key_strindex: 0,
        value: Some(AnyValue {
            value: Some(value.into().0),
        }),
    }
}

/// An attribute's value.
struct Value(any_value::Value);

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Self(any_value::Value::StringValue(v.to_owned()))
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Self(any_value::Value::StringValue(v))
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self(any_value::Value::IntValue(v))
    }
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Self(any_value::Value::IntValue(v.min(i64::MAX as u64) as i64))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Self(any_value::Value::DoubleValue(v))
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Self(any_value::Value::BoolValue(v))
    }
}
