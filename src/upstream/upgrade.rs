//! A true time to first token for clients that do not stream
//! (`stream_upgrade`, off by default).
//!
//! A non-streamed answer's first byte comes with the whole generation, so
//! its time to first token is unknown (the record says `null`). With
//! `stream_upgrade`, anteroom sends such a request to the backend as a
//! stream (`"stream": true`, `"stream_options": {"include_usage": true}`),
//! times the first token and the rest from the events, and answers the
//! client with the JSON the backend would have sent for the request as it
//! was ([`Assembler`]): the same fields, with their values put back
//! together from the deltas (content, reasoning, tool calls merged by
//! index, log-probabilities, each choice by its index, the finish reason,
//! the usage and llama.cpp's `timings`).
//!
//! Only where that answer can be put back together faithfully: a chat or
//! text completion that names no `stream_options` of its own, at a
//! llama.cpp upstream (whose two answers are known field by field: its
//! server builds both from one result). Anything else goes as it came. A
//! stream that cannot be put back together (an error event, an event that
//! is not JSON, no end) is a 502: the client asked for one JSON answer and
//! there is none to give.

use std::borrow::Cow;

use crate::types::Shape;
use bytes::Bytes;
use serde_json::{Map, Value};

/// `body` asking for a stream with its usage: the top-level `stream` set to
/// `true` (replaced where it is, else added) and
/// `"stream_options":{"include_usage":true}` added. `None` if it is not a
/// JSON object the scanner reads, or already names `stream_options`.
pub(crate) fn ask_stream(body: &[u8]) -> Option<Vec<u8>> {
    let fields = crate::json_scan::scan(body);
    if fields.stream_options || fields.stream == Some(true) {
        return None;
    }
    let set = crate::json_scan::with_value(body, b"stream", b"true");
    let body = match set {
        Some(b) => b,
        None => {
            let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
            if body[open] != b'{' {
                return None;
            }
            let rest = &body[open + 1..];
            let empty = rest.trim_ascii_start().first() == Some(&b'}');
            let mut out = Vec::with_capacity(body.len() + 16);
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(b"\"stream\":true");
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(rest);
            out
        }
    };
    super::usage::ask(&body)
}

#[derive(Debug, Default)]
struct Choice {
    role: Option<String>,
    content: String,
    reasoning: String,
    refusal: Option<String>,
    text: String,
    /// Tool calls by their index: id, type, name, arguments.
    tools: std::collections::BTreeMap<u64, Map<String, Value>>,
    logprobs: Vec<Value>,
    finish_reason: Value,
}

/// The answer's own fields, from the events: the first word on those every
/// event repeats, the last on `usage` and `timings`.
#[derive(Debug, Default)]
struct Top {
    id: Option<String>,
    created: Option<Value>,
    model: Option<String>,
    system_fingerprint: Option<String>,
    usage: Option<Value>,
    timings: Option<Value>,
}

/// One event as llama-server writes it, parsed for what is put together
/// (strings borrowed from the event where they hold no escape); anything
/// else in it is left out, as llama-server's own answer leaves it.
#[derive(serde::Deserialize)]
struct Event<'a> {
    #[serde(default, borrow)]
    choices: Vec<EventChoice<'a>>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default)]
    created: Option<Value>,
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    system_fingerprint: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    timings: Option<Value>,
}

#[derive(serde::Deserialize)]
struct EventChoice<'a> {
    #[serde(default)]
    index: u64,
    #[serde(default)]
    finish_reason: Option<Value>,
    #[serde(default)]
    logprobs: Option<LogProbs>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(serde::Deserialize)]
struct LogProbs {
    #[serde(default)]
    content: Vec<Value>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Vec<ToolPart<'a>>,
}

#[derive(serde::Deserialize)]
struct ToolPart<'a> {
    #[serde(default)]
    index: u64,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    function: Option<FunctionPart<'a>>,
}

#[derive(serde::Deserialize)]
struct FunctionPart<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<Cow<'a, str>>,
}

/// Puts a non-streamed answer back together from a stream's events (see
/// the module docs).
#[derive(Debug)]
pub struct Assembler {
    shape: Shape,
    top: Top,
    choices: std::collections::BTreeMap<u64, Choice>,
    done: bool,
    error: Option<String>,
}

impl Assembler {
    /// For an answer of this shape.
    pub fn new(shape: Shape) -> Self {
        Self {
            shape,
            top: Top::default(),
            choices: Default::default(),
            done: false,
            error: None,
        }
    }

    /// Take one event's `data:` payload; whether it carried output (a
    /// token: content, reasoning, text, a tool call's part).
    pub fn event(&mut self, payload: &[u8]) -> bool {
        let payload = payload.trim_ascii();
        if payload == b"[DONE]" {
            self.done = true;
            return false;
        }
        if self.error.is_some() {
            return false;
        }
        let Ok(ev) = serde_json::from_slice::<Event<'_>>(payload) else {
            self.error =
                Some("the upstream's stream held an event that is not a JSON object".into());
            return false;
        };
        if ev.error.is_some() {
            self.error = Some(format!(
                "the upstream's stream ended with an error: {}",
                String::from_utf8_lossy(payload)
            ));
            return false;
        }
        let top = &mut self.top;
        let first = |have: &mut Option<String>, new: Option<Cow<'_, str>>| {
            if have.is_none() {
                *have = new.map(Cow::into_owned);
            }
        };
        first(&mut top.id, ev.id);
        first(&mut top.model, ev.model);
        first(&mut top.system_fingerprint, ev.system_fingerprint);
        if top.created.is_none() {
            top.created = ev.created;
        }
        if ev.usage.is_some() {
            top.usage = ev.usage;
        }
        if ev.timings.is_some() {
            top.timings = ev.timings;
        }
        let mut output = false;
        for c in ev.choices {
            output |= self.choice(c);
        }
        output
    }

    fn choice(&mut self, c: EventChoice<'_>) -> bool {
        let ch = self.choices.entry(c.index).or_default();
        let mut output = false;
        if let Some(f) = c.finish_reason.filter(|f| !f.is_null()) {
            ch.finish_reason = f;
        }
        if let Some(lp) = c.logprobs {
            ch.logprobs.extend(lp.content);
        }
        if let Some(t) = c.text {
            output |= !t.is_empty();
            ch.text.push_str(&t);
        }
        if let Some(d) = c.delta {
            if let Some(r) = d.role {
                ch.role = Some(r.into_owned());
            }
            for (to, part) in [
                (&mut ch.content, d.content),
                (&mut ch.reasoning, d.reasoning_content),
            ] {
                if let Some(s) = part {
                    output |= !s.is_empty();
                    to.push_str(&s);
                }
            }
            if let Some(r) = d.refusal {
                ch.refusal.get_or_insert_default().push_str(&r);
            }
            for part in d.tool_calls {
                output |= merge_tool_call(&mut ch.tools, part);
            }
        }
        output
    }

    /// The whole answer, as JSON text; an error if the stream did not end
    /// (`[DONE]`), failed, or gave nothing to put together.
    pub fn finish(&mut self) -> Result<Bytes, String> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if !self.done {
            return Err("the upstream's stream ended before its [DONE]".into());
        }
        if self.choices.is_empty() {
            return Err("the upstream's stream held no choice".into());
        }
        let chat = self.shape == Shape::Chat;
        let choices: Vec<Value> = std::mem::take(&mut self.choices)
            .into_iter()
            .map(|(index, ch)| {
                let mut out = Map::new();
                out.insert("index".into(), index.into());
                out.insert("finish_reason".into(), ch.finish_reason);
                let logprobs = (!ch.logprobs.is_empty())
                    .then(|| serde_json::json!({ "content": ch.logprobs }));
                if chat {
                    let mut msg = Map::new();
                    let role = ch.role.unwrap_or_else(|| "assistant".into());
                    msg.insert("role".into(), role.into());
                    msg.insert("content".into(), ch.content.into());
                    if !ch.reasoning.is_empty() {
                        msg.insert("reasoning_content".into(), ch.reasoning.into());
                    }
                    if let Some(r) = ch.refusal {
                        msg.insert("refusal".into(), r.into());
                    }
                    if !ch.tools.is_empty() {
                        let calls = ch.tools.into_values().map(Value::Object).collect();
                        msg.insert("tool_calls".into(), Value::Array(calls));
                    }
                    out.insert("message".into(), Value::Object(msg));
                    // A chat choice has log-probabilities only when asked.
                    if let Some(lp) = logprobs {
                        out.insert("logprobs".into(), lp);
                    }
                } else {
                    out.insert("text".into(), ch.text.into());
                    out.insert("logprobs".into(), logprobs.unwrap_or(Value::Null));
                }
                Value::Object(out)
            })
            .collect();
        let t = std::mem::take(&mut self.top);
        let mut top = Map::new();
        let fields = [
            ("id", t.id.map(Value::from)),
            ("created", t.created),
            ("model", t.model.map(Value::from)),
            ("system_fingerprint", t.system_fingerprint.map(Value::from)),
            ("usage", t.usage),
            ("timings", t.timings),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                top.insert(k.into(), v);
            }
        }
        top.insert("choices".into(), Value::Array(choices));
        let object = if chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        top.insert("object".into(), object.into());
        serde_json::to_vec(&Value::Object(top))
            .map(Bytes::from)
            .map_err(|e| e.to_string())
    }
}

/// Most bytes of a stream read to put one answer together (the non-streamed
/// answer's own bound in [`crate::telemetry::observe`]: 8 MiB).
const MAX_STREAM: usize = 8 << 20;

/// A stream being read to its end and put back together, under the
/// guard's timeouts; the first and last token timed into the tap.
pub struct Assembling<S> {
    resp: Option<http::Response<S>>,
    carry: Vec<u8>,
    read: usize,
    asm: Assembler,
    tap: Option<crate::telemetry::Tap>,
}

impl<S> std::fmt::Debug for Assembling<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembling")
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

/// The header a client sets to have its request upgraded (`1`, `true`) or
/// not (`0`, `false`), whatever `stream_upgrade` says.
pub const HEADER: &str = "x-anteroom-stream-upgrade";

/// What a request's [`HEADER`] asks for: `None` if it is absent or says
/// neither.
pub fn asked(headers: &http::HeaderMap) -> Option<bool> {
    match headers.get(HEADER)?.as_bytes() {
        b"1" | b"true" => Some(true),
        b"0" | b"false" => Some(false),
        _ => None,
    }
}

impl<S> Assembling<S>
where
    S: http_body::Body<Data = Bytes, Error = crate::BoxError> + Unpin,
{
    /// Read `resp`, a stream, into an answer of `shape`.
    pub fn new(resp: http::Response<S>, shape: Shape, tap: Option<crate::telemetry::Tap>) -> Self {
        Self {
            resp: Some(resp),
            carry: Vec::new(),
            read: 0,
            asm: Assembler::new(shape),
            tap,
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(payload) = line.strip_prefix(b"data:") {
            if self.asm.event(payload) {
                if let Some(tap) = &self.tap {
                    tap.token_out();
                }
            }
        }
    }

    /// Read on; once the stream has ended, the head of the answer (its
    /// headers those of the stream, but for its type and length) and its
    /// JSON, or why there is none.
    pub fn poll(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(http::response::Parts, Bytes), crate::BoxError>> {
        use crate::error::UpstreamUnavailable;
        use std::task::Poll;
        loop {
            let Some(resp) = self.resp.as_mut() else {
                return Poll::Ready(Err("polled after completion".into()));
            };
            let frame = match std::pin::Pin::new(resp.body_mut()).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => break,
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(UpstreamUnavailable::cut_short(e).into()))
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            self.read += data.len();
            if self.read > MAX_STREAM {
                return Poll::Ready(Err(UpstreamUnavailable::cut_short(format!(
                    "the upstream's stream passed {MAX_STREAM} bytes, more than one answer anteroom puts together"
                ))
                .into()));
            }
            let mut rest = &data[..];
            while let Some(n) = memchr::memchr(b'\n', rest) {
                if self.carry.is_empty() {
                    self.line(&rest[..n]);
                } else {
                    let mut line = std::mem::take(&mut self.carry);
                    line.extend_from_slice(&rest[..n]);
                    self.line(&line);
                }
                rest = &rest[n + 1..];
            }
            self.carry.extend_from_slice(rest);
        }
        if !self.carry.is_empty() {
            let line = std::mem::take(&mut self.carry);
            self.line(&line);
        }
        let json = match self.asm.finish() {
            Ok(json) => json,
            Err(e) => return Poll::Ready(Err(UpstreamUnavailable::cut_short(e).into())),
        };
        let Some(resp) = self.resp.take() else {
            return Poll::Ready(Err("polled after completion".into()));
        };
        // The stream's body (its connection) goes: it has ended.
        let (mut parts, _) = resp.into_parts();
        let h = &mut parts.headers;
        h.remove(http::header::TRANSFER_ENCODING);
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json; charset=utf-8"),
        );
        h.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(json.len()),
        );
        Poll::Ready(Ok((parts, json)))
    }
}

/// Merge one streamed tool-call part into the calls so far; whether it
/// carried output (a name or arguments).
fn merge_tool_call(
    tools: &mut std::collections::BTreeMap<u64, Map<String, Value>>,
    part: ToolPart<'_>,
) -> bool {
    let tc = tools.entry(part.index).or_default();
    let mut output = false;
    for (key, v) in [("id", part.id), ("type", part.kind)] {
        if let Some(v) = v {
            tc.insert(key.into(), v.into_owned().into());
        }
    }
    if let Some(f) = part.function {
        let func = tc
            .entry("function")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(func) = func {
            for (key, s) in [("name", f.name), ("arguments", f.arguments)] {
                let Some(s) = s else { continue };
                output |= !s.is_empty();
                match func.get_mut(key) {
                    Some(Value::String(have)) => have.push_str(&s),
                    _ => {
                        func.insert(key.into(), s.into_owned().into());
                    }
                }
            }
        }
    }
    tc.entry("type").or_insert_with(|| "function".into());
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(shape: Shape, events: &[Value]) -> Value {
        let mut a = Assembler::new(shape);
        for e in events {
            a.event(e.to_string().as_bytes());
        }
        a.event(b"[DONE]");
        serde_json::from_slice(&a.finish().unwrap()).unwrap()
    }

    /// llama-server's chat stream, as its server writes it: a role chunk,
    /// reasoning and content deltas, a tool call in parts, the finish
    /// chunk, the usage chunk with the timings.
    #[test]
    fn a_llama_cpp_chat_stream_is_put_back_together() {
        let chunk = |delta: Value, finish: Value| {
            serde_json::json!({"choices":[{"finish_reason":finish,"index":0,"delta":delta}],
                "created":1,"id":"chatcmpl-x","model":"m","system_fingerprint":"b1","object":"chat.completion.chunk"})
        };
        let events = [
            chunk(
                serde_json::json!({"role":"assistant","content":null}),
                Value::Null,
            ),
            chunk(
                serde_json::json!({"reasoning_content":"think "}),
                Value::Null,
            ),
            chunk(serde_json::json!({"reasoning_content":"more"}), Value::Null),
            chunk(serde_json::json!({"content":"Hel"}), Value::Null),
            chunk(serde_json::json!({"content":"lo"}), Value::Null),
            chunk(
                serde_json::json!({"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather"}}]}),
                Value::Null,
            ),
            chunk(
                serde_json::json!({"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}),
                Value::Null,
            ),
            chunk(
                serde_json::json!({"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}}]}),
                Value::Null,
            ),
            chunk(serde_json::json!({}), "tool_calls".into()),
            serde_json::json!({"choices":[],"created":1,"id":"chatcmpl-x","model":"m","system_fingerprint":"b1",
                "object":"chat.completion.chunk","usage":{"completion_tokens":9,"prompt_tokens":5,"total_tokens":14,
                "prompt_tokens_details":{"cached_tokens":0}},"timings":{"prompt_n":5,"predicted_n":9}}),
        ];
        let got = assemble(Shape::Chat, &events);
        let want = serde_json::json!({
            "choices":[{"finish_reason":"tool_calls","index":0,"message":{"role":"assistant","content":"Hello",
                "reasoning_content":"think more","tool_calls":[{"type":"function","function":{"name":"get_weather",
                "arguments":"{\"city\":\"Paris\"}"},"id":"call_1"}]}}],
            "created":1,"model":"m","system_fingerprint":"b1","object":"chat.completion",
            "usage":{"completion_tokens":9,"prompt_tokens":5,"total_tokens":14,"prompt_tokens_details":{"cached_tokens":0}},
            "id":"chatcmpl-x","timings":{"prompt_n":5,"predicted_n":9}
        });
        assert_eq!(got, want);
    }

    #[test]
    fn choices_are_put_together_by_index_and_text_completions_too() {
        let ev = |i: u64, text: &str, finish: Value| {
            serde_json::json!({"choices":[{"text":text,"index":i,"logprobs":null,"finish_reason":finish}],
                "created":1,"id":"cmpl-1","model":"m","object":"text_completion"})
        };
        let events = [
            ev(0, "a", Value::Null),
            ev(1, "x", Value::Null),
            ev(0, "b", Value::Null),
            ev(1, "y", "length".into()),
            ev(0, "", "stop".into()),
        ];
        let got = assemble(Shape::Text, &events);
        assert_eq!(got["object"], "text_completion");
        assert_eq!(got["choices"][0]["text"], "ab");
        assert_eq!(got["choices"][0]["finish_reason"], "stop");
        assert_eq!(got["choices"][1]["text"], "xy");
        assert_eq!(got["choices"][1]["finish_reason"], "length");
        assert_eq!(got["choices"][1]["logprobs"], Value::Null);
    }

    #[test]
    fn a_stream_that_cannot_be_put_together_is_an_error() {
        let mut a = Assembler::new(Shape::Chat);
        a.event(br#"{"choices":[{"index":0,"delta":{"content":"a"}}]}"#);
        assert!(a.finish().is_err(), "no [DONE]");
        let mut a = Assembler::new(Shape::Chat);
        a.event(br#"{"error":{"message":"boom","code":500}}"#);
        a.event(b"[DONE]");
        assert!(a.finish().unwrap_err().contains("boom"));
        let mut a = Assembler::new(Shape::Chat);
        a.event(b"not json");
        a.event(b"[DONE]");
        assert!(a.finish().is_err());
        let mut a = Assembler::new(Shape::Chat);
        a.event(b"[DONE]");
        assert!(a.finish().is_err(), "no choice");
    }

    #[test]
    fn asking_for_a_stream_sets_stream_and_usage() {
        let v = |b: Vec<u8>| serde_json::from_slice::<Value>(&b).unwrap();
        let got = v(ask_stream(br#"{"model":"m","stream":false,"messages":[]}"#).unwrap());
        assert_eq!(got["stream"], true);
        assert_eq!(got["stream_options"]["include_usage"], true);
        let got = v(ask_stream(br#"{"model":"m"}"#).unwrap());
        assert_eq!(
            (got["stream"].clone(), got["model"].clone()),
            (true.into(), "m".into())
        );
        // Its own stream options, or a stream already: left alone.
        assert_eq!(ask_stream(br#"{"stream_options":{},"model":"m"}"#), None);
        assert_eq!(ask_stream(br#"{"stream":true}"#), None);
        assert_eq!(ask_stream(b"[]"), None);
    }
}
