//! The one record every request leaves: what it was, what happened to it, and
//! where its time went.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, Uri};
use serde::{Deserialize, Serialize};

use super::Tap;

use crate::types::Priority;

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A response with a status below 400, sent to its last byte.
    Ok,
    /// Turned away by anteroom itself (queue full or timed out, shutting
    /// down): the client is told when to come back.
    Rejected,
    /// An error status, from anteroom (400, 413, 502, 504, …) or from the
    /// upstream.
    Error,
    /// The upstream's body failed part-way: the client got a cut response.
    Truncated,
    /// The client went away before the response was complete.
    Cancelled,
}

impl Outcome {
    /// The label value in metrics and the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
            Outcome::Truncated => "truncated",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// Where the token counts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// The backend's `usage` object.
    Usage,
    /// llama.cpp's `timings` (`predicted_n`, `prompt_n` + `cache_n`), where
    /// there was no `usage`.
    Timings,
    /// Counted by anteroom: one per token event of the stream (short when
    /// an event carries more than one token).
    Counted,
}

/// One request, as written to the request log (one JSON object per line).
///
/// Times are milliseconds as floats (microsecond resolution); a field is
/// `null` when it does not apply (no queue for a pass-through request, no
/// first token for an error).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The `x-request-id` the client sent, or the one anteroom generated.
    pub request_id: String,
    /// Wall-clock time the request's headers were read, RFC 3339 UTC.
    pub received: String,
    /// HTTP method.
    pub method: String,
    /// Request path (the query is left out: it may hold secrets).
    pub path: String,
    /// `model` from the JSON body.
    pub model: Option<String>,
    /// Priority it was admitted at; `null` for requests that bypass admission.
    pub priority: Option<Priority>,
    /// The client's IP address.
    pub client: Option<IpAddr>,
    /// The API key's name, when keys are configured.
    #[serde(default)]
    pub tenant: Option<String>,
    /// The name of the upstream that answered (`upstream` when there is one
    /// `--upstream`); `null` when it was not sent to any.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Whether the response was a stream (`stream: true` or an SSE response).
    pub stream: bool,
    /// Sent to the backend as a stream and answered as the JSON the client
    /// asked for (`stream_upgrade`): its time to first token is the first
    /// token's arrival from the backend.
    #[serde(default)]
    pub upgraded: bool,
    /// Status sent to the client; 499 when the client left before any.
    pub status: u16,
    /// anteroom's error code (`queue_full`, `upstream_timeout`, …).
    pub error: Option<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// Where the time went, and the tokens.
    #[serde(flatten)]
    pub timings: Timings,
}

/// The numbers of a [`Record`]: computed on the request path without an
/// allocation, and all the metrics need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Arrival → dispatch to the upstream (for a rejected request: arrival →
    /// rejection, the time it waited in vain); for a preempted one, the sum
    /// of its waits.
    pub queue_ms: Option<f64>,
    /// Dispatch → the upstream's response headers.
    pub upstream_headers_ms: Option<f64>,
    /// Arrival → the first generated token was handed to the client (for a
    /// non-streamed response: its first body byte).
    pub ttft_ms: Option<f64>,
    /// Dispatch → first token: the backend's own time to first token.
    pub backend_ttft_ms: Option<f64>,
    /// The backend's own prompt processing (prefill) time, where it reports
    /// it (llama.cpp's `timings.prompt_ms`).
    #[serde(default)]
    pub backend_prompt_ms: Option<f64>,
    /// How long the request waited inside the backend before its prompt was
    /// processed (its own queue, and the transport), where the backend
    /// reports its timings: `backend_ttft_ms − backend_prompt_ms` for a
    /// stream, the time to the whole answer minus `prompt_ms` and
    /// `predicted_ms` for a JSON one. Above a few milliseconds, the queue
    /// has moved into the backend.
    #[serde(default)]
    pub backend_wait_ms: Option<f64>,
    /// Arrival → last byte handed to the client.
    pub e2e_ms: Option<f64>,
    /// Mean time per output token after the first.
    pub tpot_ms: Option<f64>,
    /// Inter-token latency (gap between token events) of this request: median.
    pub itl_p50_ms: Option<f64>,
    /// Inter-token latency, 90th percentile.
    pub itl_p90_ms: Option<f64>,
    /// Inter-token latency, 99th percentile.
    pub itl_p99_ms: Option<f64>,
    /// Inter-token latency, largest gap.
    pub itl_max_ms: Option<f64>,
    /// Prompt tokens (from `usage` only).
    pub prompt_tokens: Option<u64>,
    /// Generated tokens.
    pub completion_tokens: Option<u64>,
    /// Where the token counts came from.
    pub tokens_from: Option<TokenSource>,
    /// SSE `data:` events seen.
    pub events: Option<u32>,
    /// SSE events that were not JSON, or a stream that stopped mid-line.
    pub malformed: bool,
    /// Times anteroom sent it again after the upstream refused it (429, 503,
    /// a refused connection).
    #[serde(default)]
    pub upstream_retries: u32,
    /// Times an urgent request took its slot before it had answered
    /// (`preempt`); it then waited again and was sent again.
    #[serde(default)]
    pub preemptions: u32,
    /// Backend time of those stopped attempts, thrown away. Neither queue
    /// time (`queue_ms` covers only its waits) nor model time of the
    /// answer the client got.
    #[serde(default)]
    pub preempted_ms: f64,
}

/// A finished request as the request path hands it on: numbers and cheap
/// handles (reference-counted or `Copy`). The strings of its [`Record`] are
/// made by [`Finished::into_record`], on the request log's thread, and only
/// when there is a log.
#[derive(Clone, Debug)]
pub struct Finished {
    /// `x-request-id`.
    pub request_id: Option<HeaderValue>,
    /// Wall-clock arrival.
    pub received: SystemTime,
    /// Method.
    pub method: Method,
    /// URI (only its path is logged).
    pub uri: Uri,
    /// What classify noted (model, priority, stream), if it was admitted.
    pub tap: Tap,
    /// Client IP.
    pub client: Option<IpAddr>,
    /// Priority, for admitted requests.
    pub priority: Option<Priority>,
    /// Streamed.
    pub stream: bool,
    /// Status sent.
    pub status: u16,
    /// anteroom's error code.
    pub error: Option<&'static str>,
    /// How it ended.
    pub outcome: Outcome,
    /// The numbers.
    pub timings: Timings,
}

impl Finished {
    /// The log line's record.
    pub fn into_record(self) -> Record {
        Record {
            request_id: self
                .request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
            received: rfc3339(self.received),
            method: self.method.as_str().to_owned(),
            path: self.uri.path().to_owned(),
            model: self.tap.classified().and_then(|c| c.model.clone()),
            priority: self.priority,
            client: self.client,
            tenant: self.tap.tenant().map(|t| t.to_string()),
            upstream: self.tap.upstream().map(|u| u.to_string()),
            stream: self.stream,
            upgraded: self.tap.was_upgraded(),
            status: self.status,
            error: self.error.map(str::to_owned),
            outcome: self.outcome,
            timings: self.timings,
        }
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-27T21:05:03.123Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 → (year, month, day): Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_813_503_123);
        assert_eq!(rfc3339(t), "2026-11-27T21:05:03.123Z");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000Z");
    }
}
