//! Reading a response as it passes, without changing or holding it.
//!
//! An [`Observer`] is fed every data frame of a response body. For an SSE
//! stream (`text/event-stream`) it splits the bytes into lines, and for each
//! `data:` line decides whether the event carries generated output (a token
//! event), is the `[DONE]` marker, or carries the `usage` numbers. For a JSON
//! body it keeps references to the frames (no copy) and reads `usage` at the
//! end. Anything else is not looked at.
//!
//! Nothing is parsed into a tree: [`scan_event`] searches an event for the
//! few `"key":` patterns that matter with SIMD substring search (`memchr`'s
//! `memmem`). Whitespace after the colon is allowed, before it is not (no
//! server writes that). A token event is one with a non-empty
//! - `content`, `reasoning_content`, `reasoning` or `refusal` string (chat
//!   `delta`), or a `tool_calls` / `function_call` value (chat tool calls);
//! - `text` string (completions);
//! - `delta` string in a `response.*.delta` event (the Responses API).
//!
//! Token counts come from the last `usage` object seen (`prompt_tokens` /
//! `completion_tokens`, or the Responses API's `input_tokens` /
//! `output_tokens`). llama.cpp's per-request `timings` (`prompt_ms`,
//! `predicted_ms`) are read where it puts them: in a stream's last chunk (an
//! event without output, so token events are never searched for them), and
//! after `usage` at the end of a JSON body (or right before it, where its
//! keys are sorted: only a body whose `usage` follows an object is searched
//! back).
//!
//! Costs: no allocation per event. A line split across two frames is copied
//! into a carry buffer that is reused for the whole stream; a JSON body's
//! frames are kept as `Bytes` handles (reference counts), and joined only if
//! there is more than one, once, at the end.

use bytes::Bytes;
use std::sync::LazyLock;

use memchr::memmem::{self, Finder};
use memchr::{memchr, memchr2};

/// What kind of body is being observed, from its `content-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `text/event-stream`: scanned event by event.
    Sse,
    /// `application/json`: `usage` read at the end.
    Json,
    /// Anything else: passed through unobserved.
    Opaque,
}

impl Framing {
    /// The framing of a response with this `content-type`.
    pub fn of(content_type: Option<&[u8]>) -> Self {
        let Some(ct) = content_type else {
            return Framing::Opaque;
        };
        let starts = |p: &[u8]| ct.len() >= p.len() && ct[..p.len()].eq_ignore_ascii_case(p);
        if starts(b"text/event-stream") {
            Framing::Sse
        } else if starts(b"application/json") {
            Framing::Json
        } else {
            Framing::Opaque
        }
    }
}

/// Token counts reported by the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: Option<u64>,
    /// Generated (output) tokens.
    pub completion_tokens: Option<u64>,
}

/// The backend's own account of a request (llama.cpp's `timings`), in
/// milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BackendTimings {
    /// Prompt processing (prefill).
    pub prompt_ms: Option<f64>,
    /// Generation after the first token.
    pub predicted_ms: Option<f64>,
    /// Prompt tokens: those processed (`prompt_n`) and those taken from
    /// the cache (`cache_n`).
    pub prompt_n: Option<u64>,
    /// Generated tokens (`predicted_n`): the count a stream's events can
    /// fall short of, when llama-server sends two tokens in one chunk.
    pub predicted_n: Option<u64>,
}

/// What one SSE `data:` payload was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Carries generated output.
    Token,
    /// Valid, but no output (a role chunk, a finish chunk, a usage chunk).
    Other,
    /// `[DONE]`.
    Done,
    /// Not a JSON object.
    Malformed,
}

/// Lines longer than this are not assembled across frames (counted as
/// malformed instead): a bound on what one stream can make us hold.
const MAX_CARRY: usize = 1 << 20;
/// A JSON body larger than this is not kept for its `usage`.
const MAX_JSON: usize = 8 << 20;

/// Observes one response body. See the [module docs](self).
#[derive(Debug)]
pub struct Observer {
    framing: Framing,
    /// An SSE line begun in an earlier frame.
    carry: Vec<u8>,
    carry_overflow: bool,
    /// A JSON body's frames, kept until the end.
    json: Vec<Bytes>,
    json_len: usize,
    /// `data:` events seen.
    pub events: u32,
    /// Events that carried output.
    pub token_events: u32,
    /// Events that were not JSON.
    pub malformed: u32,
    /// `[DONE]` was seen.
    pub done: bool,
    /// The last `usage` numbers seen.
    pub usage: Usage,
    /// The backend's `timings`, where it reports them.
    pub timings: BackendTimings,
}

impl Observer {
    /// An observer for a body of this framing.
    pub fn new(framing: Framing) -> Self {
        Self {
            framing,
            carry: Vec::new(),
            carry_overflow: false,
            json: Vec::new(),
            json_len: 0,
            events: 0,
            token_events: 0,
            malformed: 0,
            done: false,
            usage: Usage::default(),
            timings: BackendTimings::default(),
        }
    }

    /// The framing observed.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Observe one data frame; returns how many token events it completed.
    pub fn feed(&mut self, chunk: &Bytes) -> u32 {
        match self.framing {
            Framing::Sse => {
                let before = self.token_events;
                self.feed_sse(chunk);
                self.token_events - before
            }
            Framing::Json => {
                self.json_len += chunk.len();
                if self.json_len <= MAX_JSON {
                    self.json.push(chunk.clone());
                } else {
                    self.json = Vec::new();
                }
                0
            }
            Framing::Opaque => 0,
        }
    }

    /// The body ended: read what was held back. Returns whether an SSE
    /// stream stopped in the middle of a line.
    pub fn finish(&mut self) -> bool {
        match self.framing {
            Framing::Sse => {
                let partial = !self.carry.is_empty() || self.carry_overflow;
                if !self.carry.is_empty() {
                    // A last line without its newline still counts.
                    let line = std::mem::take(&mut self.carry);
                    self.line(&line);
                }
                partial
            }
            Framing::Json => {
                let chunks = std::mem::take(&mut self.json);
                if self.json_len <= MAX_JSON {
                    let joined;
                    let body: &[u8] = match chunks.as_slice() {
                        [] => &[],
                        [one] => one,
                        many => {
                            joined = many.concat();
                            &joined
                        }
                    };
                    (self.usage, self.timings) = json_usage_and_timings(body);
                }
                false
            }
            Framing::Opaque => false,
        }
    }

    fn feed_sse(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if !self.carry.is_empty() || self.carry_overflow {
            let Some(nl) = memchr(b'\n', rest) else {
                self.carry_more(rest);
                return;
            };
            self.carry_more(&rest[..nl]);
            rest = &rest[nl + 1..];
            if self.carry_overflow {
                self.carry_overflow = false;
                self.events += 1;
                self.malformed += 1;
            } else {
                let line = std::mem::take(&mut self.carry);
                self.line(&line);
                // Give the buffer back so its capacity is reused.
                self.carry = line;
                self.carry.clear();
            }
        }
        while let Some(nl) = memchr(b'\n', rest) {
            self.line(&rest[..nl]);
            rest = &rest[nl + 1..];
        }
        if !rest.is_empty() {
            self.carry_more(rest);
        }
    }

    fn carry_more(&mut self, bytes: &[u8]) {
        if self.carry_overflow || self.carry.len() + bytes.len() > MAX_CARRY {
            self.carry_overflow = true;
            self.carry = Vec::new();
        } else {
            self.carry.extend_from_slice(bytes);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(payload) = line.strip_prefix(b"data:") else {
            return; // event:, id:, retry:, comments, blank separators
        };
        self.events += 1;
        match scan_event(payload, &mut self.usage) {
            Event::Token => self.token_events += 1,
            Event::Done => self.done = true,
            Event::Malformed => self.malformed += 1,
            // llama.cpp's `timings` object is the last field of its last
            // chunk, so that event ends `}}`: only such events are searched
            // (a role or finish chunk elsewhere ends `]}` or `"}`).
            Event::Other if trim(payload).ends_with(b"}}") => {
                if let Some(t) = event_timings(payload) {
                    self.timings = t;
                }
            }
            Event::Other => {}
        }
    }
}

/// A test of the value that follows a key.
type Check = fn(&[u8]) -> bool;

/// The byte patterns an event is searched for, each with a SIMD substring
/// searcher built once. A pattern `"key":` cannot occur inside a JSON
/// string (a quote there is always escaped, `\"`), so a hit is a key.
struct Patterns {
    content: Finder<'static>,
    text: Finder<'static>,
    others: [(Finder<'static>, Check); 5],
    responses: Finder<'static>,
    delta: Finder<'static>,
    usage: Finder<'static>,
}

static PATTERNS: LazyLock<Patterns> = LazyLock::new(|| Patterns {
    content: Finder::new(b"\"content\":"),
    text: Finder::new(b"\"text\":"),
    others: [
        (Finder::new(b"\"reasoning_content\":"), nonempty_string),
        (Finder::new(b"\"reasoning\":"), nonempty_string),
        (Finder::new(b"\"refusal\":"), nonempty_string),
        (Finder::new(b"\"tool_calls\":"), nonempty_array),
        (Finder::new(b"\"function_call\":"), |v| {
            v.first() == Some(&b'{')
        }),
    ],
    responses: Finder::new(b"\"type\":\"response."),
    delta: Finder::new(b"\"delta\":"),
    usage: Finder::new(b"\"usage\":"),
});

/// Whether some value of the key `finder` finds satisfies `pred`.
fn any_value(p: &[u8], finder: &Finder<'_>, pred: Check) -> bool {
    let n = finder.needle().len();
    finder.find_iter(p).any(|at| pred(trim_start(&p[at + n..])))
}

/// Classify one SSE `data:` payload and update `usage` from it.
///
/// A typical chat token event costs two substring searches: `"content":`
/// (found) and `"usage":` (not found). The other keys are looked for only
/// when there is no content.
pub fn scan_event(payload: &[u8], usage: &mut Usage) -> Event {
    let p = trim(payload);
    if p == b"[DONE]" {
        return Event::Done;
    }
    if p.first() != Some(&b'{') || p.last() != Some(&b'}') {
        return Event::Malformed;
    }
    let pats = &*PATTERNS;
    let mut token = any_value(p, &pats.content, nonempty_string);
    if !token {
        if let Some(at) = pats.responses.find(p) {
            // Responses API: only `*.delta` events are output; the `*.done`
            // and `response.completed` events repeat the whole text.
            let ty = &p[at + pats.responses.needle().len() - "response.".len() - 1..];
            let end = string_end(ty, 0).unwrap_or(0);
            token = ty[..end].ends_with(b".delta") && any_value(p, &pats.delta, nonempty_string);
        } else {
            token = any_value(p, &pats.text, nonempty_string)
                || pats
                    .others
                    .iter()
                    .any(|(finder, pred)| any_value(p, finder, *pred));
        }
    }
    if let Some(at) = pats.usage.find(p) {
        let rest = &p[at..];
        if trim_start(&rest[pats.usage.needle().len()..]).first() == Some(&b'{') {
            walk_keys(rest, |key, value| match key {
                Key::PromptTokens => {
                    if let Some(n) = leading_u64(value) {
                        usage.prompt_tokens = Some(n);
                    }
                }
                Key::CompletionTokens => {
                    if let Some(n) = leading_u64(value) {
                        usage.completion_tokens = Some(n);
                    }
                }
                _ => {}
            });
        }
    }
    if token {
        Event::Token
    } else {
        Event::Other
    }
}

/// The `usage` of a whole JSON response body.
#[cfg(test)]
fn json_usage(body: &[u8]) -> Usage {
    json_usage_and_timings(body).0
}

static TIMINGS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"timings\":"));

/// `prompt_ms` and `predicted_ms` of the `timings` object that starts at
/// `obj` (its `{`), up to its first `}` (it holds only numbers).
fn timings_object(obj: &[u8]) -> Option<BackendTimings> {
    let obj = trim_start(obj);
    if obj.first() != Some(&b'{') {
        return None;
    }
    let end = memchr(b'}', obj)?;
    let obj = &obj[..end];
    let number = |key: &[u8]| -> Option<f64> {
        let at = memmem::find(obj, key)?;
        let v = trim_start(&obj[at + key.len()..]);
        let n = v
            .iter()
            .take_while(|c| c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'+' | b'e' | b'E'))
            .count();
        let x: f64 = std::str::from_utf8(&v[..n]).ok()?.parse().ok()?;
        (x.is_finite() && x >= 0.0).then_some(x)
    };
    // A count: a whole number that fits (llama.cpp writes integers).
    let count = |key: &[u8]| -> Option<u64> {
        let x = number(key)?;
        (x.fract() == 0.0 && x < 2f64.powi(53)).then_some(x as u64)
    };
    let prompt_n = count(b"\"prompt_n\":");
    let t = BackendTimings {
        prompt_ms: number(b"\"prompt_ms\":"),
        predicted_ms: number(b"\"predicted_ms\":"),
        prompt_n: prompt_n.map(|n| n.saturating_add(count(b"\"cache_n\":").unwrap_or(0))),
        predicted_n: count(b"\"predicted_n\":"),
    };
    t.prompt_ms.is_some().then_some(t)
}

/// The `timings` of an SSE event without output (llama.cpp's last chunk).
pub(crate) fn event_timings(payload: &[u8]) -> Option<BackendTimings> {
    let at = TIMINGS.find(payload)?;
    timings_object(&payload[at + TIMINGS.needle().len()..])
}

/// The `usage` and llama.cpp `timings` of a whole JSON response body.
pub(crate) fn json_usage_and_timings(body: &[u8]) -> (Usage, BackendTimings) {
    let mut usage = Usage::default();
    let mut timings = BackendTimings::default();
    // `usage` comes last in every server's answer; start at its key rather
    // than walking a long generated text.
    static USAGE: LazyLock<memmem::FinderRev<'static>> =
        LazyLock::new(|| memmem::FinderRev::new(b"\"usage\""));
    if let Some(at) = USAGE.rfind(body) {
        // llama.cpp puts `timings` last, after `usage` (the short tail
        // every body has there is searched), or, where its keys are sorted,
        // right before it: then `usage` follows an object, and only so far
        // back is looked.
        let after = TIMINGS
            .find(&body[at..])
            .and_then(|i| timings_object(&body[at + i + TIMINGS.needle().len()..]));
        let before = || {
            if !trim(&body[..at]).ends_with(b"},") {
                return None;
            }
            let from = at.saturating_sub(2048);
            TIMINGS
                .find_iter(&body[from..at])
                .last()
                .and_then(|i| timings_object(&body[from + i + TIMINGS.needle().len()..at]))
        };
        if let Some(t) = after.or_else(before) {
            timings = t;
        }
        let mut in_usage = false;
        walk_keys(&body[at..], |key, value| match key {
            Key::Usage => in_usage = value.first() == Some(&b'{'),
            Key::PromptTokens if in_usage => {
                usage.prompt_tokens = leading_u64(value).or(usage.prompt_tokens)
            }
            Key::CompletionTokens if in_usage => {
                usage.completion_tokens = leading_u64(value).or(usage.completion_tokens)
            }
            _ => {}
        });
    }
    (usage, timings)
}

/// The keys read inside a `usage` object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Usage,
    /// `prompt_tokens`, `input_tokens`.
    PromptTokens,
    /// `completion_tokens`, `output_tokens`.
    CompletionTokens,
}

/// Which [`Key`] ends at `b[..end]` (`end` is the index of its closing
/// quote), told by its last letter and then compared whole, quote included:
/// no scan back to the key's start, no work for the keys nobody reads.
fn key_before(b: &[u8], end: usize) -> Option<Key> {
    use Key::*;
    let candidates: &[(&[u8], Key)] = match b[..end].last()? {
        b's' => &[
            (b"completion_tokens", CompletionTokens),
            (b"output_tokens", CompletionTokens),
            (b"prompt_tokens", PromptTokens),
            (b"input_tokens", PromptTokens),
        ],
        b'e' => &[(b"usage", Usage)],
        _ => return None,
    };
    candidates.iter().find_map(|&(name, key)| {
        let n = name.len();
        (end > n && b[end - n - 1] == b'"' && &b[end - n..end] == name).then_some(key)
    })
}

/// Call `f(key, value_and_rest)` for every [`Key`] in `b`, at any depth.
///
/// Keys are found from their colons: in JSON a `"` directly before a `:`
/// (whitespace between allowed) ends a key, because inside a string every
/// quote is escaped (`\"`), so text in a value is never taken for a key.
/// One SIMD search for `:` per event; each hit costs a few byte compares.
fn walk_keys<'a>(b: &'a [u8], mut f: impl FnMut(Key, &'a [u8])) {
    for colon in memchr::memchr_iter(b':', b) {
        let mut k = colon;
        while k > 0 && matches!(b[k - 1], b' ' | b'\t' | b'\r' | b'\n') {
            k -= 1;
        }
        // b[k - 1] must be an unescaped quote.
        if k < 2 || b[k - 1] != b'"' || b[k - 2] == b'\\' {
            continue;
        }
        let Some(key) = key_before(b, k - 1) else {
            continue;
        };
        let mut v = colon + 1;
        while matches!(b.get(v), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            v += 1;
        }
        f(key, &b[v..]);
    }
}

/// Index of the quote closing the string that opens at `i`.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        let k = j + memchr2(b'"', b'\\', b.get(j..)?)?;
        if b[k] == b'"' {
            return Some(k);
        }
        j = k + 2;
    }
}

fn nonempty_string(v: &[u8]) -> bool {
    v.first() == Some(&b'"') && v.get(1).is_some_and(|&c| c != b'"')
}

fn nonempty_array(v: &[u8]) -> bool {
    v.first() == Some(&b'[') && trim(&v[1..]).first().is_some_and(|&c| c != b']')
}

/// A count at the start of `v`: a whole number that fits; `1e99`, `2.5`
/// or `-3` are no count.
fn leading_u64(v: &[u8]) -> Option<u64> {
    let digits = v.iter().take_while(|c| c.is_ascii_digit()).count();
    if matches!(v.get(digits), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    std::str::from_utf8(&v[..digits]).ok()?.parse().ok()
}

fn trim_start(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    &b[start..]
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(s: &str) -> (Event, Usage) {
        let mut u = Usage::default();
        (scan_event(s.as_bytes(), &mut u), u)
    }

    #[test]
    fn chat_content_and_role_chunks() {
        let role = r#" {"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        assert_eq!(event(role).0, Event::Other);
        let tok =
            r#" {"id":"x","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;
        assert_eq!(event(tok).0, Event::Token);
        let null = r#"{"choices":[{"delta":{"content":null},"finish_reason":"stop"}]}"#;
        assert_eq!(event(null).0, Event::Other);
        // Python's json.dumps style (a space after the colon) is read; a
        // space before the colon (no server writes that) is not.
        let spaced =
            r#"{"choices": [{"delta": {"content": "x"}}], "usage": {"completion_tokens": 5}}"#;
        assert_eq!(
            event(spaced),
            (
                Event::Token,
                Usage {
                    prompt_tokens: None,
                    completion_tokens: Some(5)
                }
            )
        );
        let reasoning = r#"{"choices":[{"delta":{"reasoning_content":"hmm"}}]}"#;
        assert_eq!(event(reasoning).0, Event::Token);
    }

    #[test]
    fn keys_inside_strings_are_not_keys() {
        // The generated text itself talks about JSON.
        let s = r#"{"choices":[{"delta":{"role":"assistant","x":"\"content\":\"boo\""}}]}"#;
        assert_eq!(event(s).0, Event::Other);
        let s = r#"{"choices":[{"delta":{"content":"say \"text\": \"hi\\\" there"}}]}"#;
        assert_eq!(event(s).0, Event::Token);
    }

    #[test]
    fn tool_calls_and_completions() {
        let tc = r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\""}}]}}]}"#;
        assert_eq!(event(tc).0, Event::Token);
        let empty = r#"{"choices":[{"delta":{"tool_calls":[ ]}}]}"#;
        assert_eq!(event(empty).0, Event::Other);
        let text = r#"{"object":"text_completion","choices":[{"text":" the","index":0}]}"#;
        assert_eq!(event(text).0, Event::Token);
    }

    #[test]
    fn usage_chunk_and_done() {
        let u = r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#;
        let (e, usage) = event(u);
        assert_eq!(e, Event::Other);
        assert_eq!(usage.prompt_tokens, Some(12));
        assert_eq!(usage.completion_tokens, Some(34));
        assert_eq!(event(" [DONE]").0, Event::Done);
        assert_eq!(event(" not json").0, Event::Malformed);
        // `usage: null` on every chunk (vLLM without include_usage) is no usage.
        let n = r#"{"choices":[{"delta":{"content":"a"}}],"usage":null}"#;
        assert_eq!(event(n), (Event::Token, Usage::default()));
    }

    #[test]
    fn responses_api_counts_only_deltas() {
        let d = r#"{"type":"response.output_text.delta","item_id":"m","delta":"Hel"}"#;
        assert_eq!(event(d).0, Event::Token);
        let done = r#"{"type":"response.output_text.done","item_id":"m","text":"Hello"}"#;
        assert_eq!(event(done).0, Event::Other);
        let completed = r#"{"type":"response.completed","response":{"output":[{"content":[{"type":"output_text","text":"Hello"}]}],"usage":{"input_tokens":5,"output_tokens":2}}}"#;
        let (e, u) = event(completed);
        assert_eq!(e, Event::Other);
        assert_eq!(u.prompt_tokens, Some(5));
        assert_eq!(u.completion_tokens, Some(2));
    }

    #[test]
    fn json_body_usage() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"\"usage\":{\"completion_tokens\":999}"}}],"usage":{"prompt_tokens":3,"completion_tokens":7}}"#;
        let u = json_usage(body);
        assert_eq!(u.prompt_tokens, Some(3));
        assert_eq!(u.completion_tokens, Some(7));
        assert_eq!(json_usage(br#"{"id":"x"}"#), Usage::default());
    }

    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        );
        for w in ["Hello", " wor", "ld"] {
            s.extend_from_slice(
                format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{w}\"}}}}]}}\r\n\r\n")
                    .as_bytes(),
            );
        }
        s.extend_from_slice(b": keep-alive comment\n\nevent: x\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n");
        s
    }

    #[test]
    fn every_split_of_a_stream_reads_the_same() {
        let s = stream();
        for cut in 0..=s.len() {
            for cut2 in [cut, (cut + 7).min(s.len()), s.len()] {
                let mut o = Observer::new(Framing::Sse);
                let mut tokens = 0;
                tokens += o.feed(&Bytes::copy_from_slice(&s[..cut]));
                tokens += o.feed(&Bytes::copy_from_slice(&s[cut..cut2]));
                tokens += o.feed(&Bytes::copy_from_slice(&s[cut2..]));
                assert!(!o.finish(), "cut at {cut}/{cut2}");
                assert_eq!(tokens, 3, "cut at {cut}/{cut2}");
                assert_eq!(o.token_events, 3);
                assert_eq!(o.events, 6);
                assert_eq!(o.malformed, 0);
                assert!(o.done);
                assert_eq!(o.usage.completion_tokens, Some(3));
                assert_eq!(o.usage.prompt_tokens, Some(9));
            }
        }
    }

    #[test]
    fn a_stream_cut_mid_line_is_reported() {
        let s = stream();
        let cut = s.len() - 20;
        let mut o = Observer::new(Framing::Sse);
        o.feed(&Bytes::copy_from_slice(&s[..cut]));
        assert!(o.finish());
        assert!(!o.done);
    }

    #[test]
    fn json_frames_are_joined_for_usage() {
        let body = br#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#;
        let mut o = Observer::new(Framing::Json);
        for piece in body.chunks(7) {
            assert_eq!(o.feed(&Bytes::copy_from_slice(piece)), 0);
        }
        o.finish();
        assert_eq!(o.usage.completion_tokens, Some(2));
        assert_eq!(o.usage.prompt_tokens, Some(4));
    }

    #[test]
    fn framing_from_content_type() {
        assert_eq!(
            Framing::of(Some(b"text/event-stream; charset=utf-8")),
            Framing::Sse
        );
        assert_eq!(Framing::of(Some(b"Application/JSON")), Framing::Json);
        assert_eq!(Framing::of(Some(b"text/plain")), Framing::Opaque);
        assert_eq!(Framing::of(None), Framing::Opaque);
    }

    /// llama.cpp's answers as its server writes them (keys in order).
    const LLAMA_LAST_CHUNK: &str = r#"{"choices":[{"delta":{},"finish_reason":"stop","index":0}],"created":1,"id":"chatcmpl-x","model":"m","object":"chat.completion.chunk","system_fingerprint":"b1","timings":{"cache_n":0,"predicted_ms":88.25,"predicted_n":8,"predicted_per_second":90.6,"predicted_per_token_ms":11.0,"prompt_ms":41.5,"prompt_n":12,"prompt_per_second":289.1,"prompt_per_token_ms":3.4},"usage":{"completion_tokens":8,"prompt_tokens":12,"total_tokens":20}}"#;

    #[test]
    fn llama_cpp_timings_from_a_stream_and_a_json_body() {
        let want = BackendTimings {
            prompt_ms: Some(41.5),
            predicted_ms: Some(88.25),
            prompt_n: Some(12),
            predicted_n: Some(8),
        };
        let mut o = Observer::new(Framing::Sse);
        let tok =
            r#"{"choices":[{"delta":{"content":"Hi"},"index":0}],"timings":{"prompt_ms":1.0}}"#;
        o.feed(&Bytes::from(format!(
            "data: {tok}\n\ndata: {LLAMA_LAST_CHUNK}\n\ndata: [DONE]\n\n"
        )));
        o.finish();
        // From the chunk without output only: token events are not searched.
        assert_eq!(o.timings, want);
        assert_eq!(o.usage.completion_tokens, Some(8));
        let body = LLAMA_LAST_CHUNK.replace(".chunk", "");
        assert_eq!(json_usage_and_timings(body.as_bytes()).1, want);
        // As llama-server writes it today: `usage`, `id`, then `timings`.
        let real = r#"{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant","content":"a b"}}],"created":1,"model":"m","system_fingerprint":"b1","object":"chat.completion","usage":{"completion_tokens":8,"prompt_tokens":29,"total_tokens":37,"prompt_tokens_details":{"cached_tokens":0}},"id":"chatcmpl-j","timings":{"cache_n":0,"prompt_n":29,"prompt_ms":41.5,"prompt_per_token_ms":0.26,"prompt_per_second":3724.1,"predicted_n":8,"predicted_ms":88.25,"predicted_per_token_ms":4.3,"predicted_per_second":227.8}}"#;
        assert_eq!(
            json_usage_and_timings(real.as_bytes()),
            (
                Usage {
                    prompt_tokens: Some(29),
                    completion_tokens: Some(8)
                },
                BackendTimings {
                    prompt_n: Some(29),
                    ..want
                }
            )
        );
        // Split across frames, as a body arrives.
        let mut o = Observer::new(Framing::Json);
        for piece in body.as_bytes().chunks(13) {
            o.feed(&Bytes::copy_from_slice(piece));
        }
        o.finish();
        assert_eq!(o.timings, want);
    }

    #[test]
    fn timings_are_read_only_where_llama_cpp_puts_them_and_only_if_numbers() {
        // OpenAI's and vLLM's bodies: `usage` follows no object; nothing is
        // searched, whatever text holds.
        let openai = r#"{"choices":[{"message":{"content":"\"timings\":{\"prompt_ms\":5}"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
        assert_eq!(
            json_usage_and_timings(openai.as_bytes()).1,
            BackendTimings::default()
        );
        for bad in [
            r#""timings":{"prompt_ms":-3}"#,
            r#""timings":{"prompt_ms":"41"}"#,
            r#""timings":{"prompt_ms":1e400}"#,
            r#""timings":{"prompt_ms":}"#,
            r#""timings":"none""#,
            r#""timings":{"prompt_n":12}"#,
        ] {
            let event = format!(r#"{{"choices":[],{bad}}}"#);
            assert_eq!(event_timings(event.as_bytes()), None, "{bad}");
        }
    }
}
