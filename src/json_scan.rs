//! Find a few top-level fields of a JSON object without parsing it.
//!
//! A chat request can carry megabytes of prompt; admission only needs
//! `priority` (and telemetry `model` and `stream`). This scanner walks the
//! object's top level once, skipping nested values and strings without
//! allocating or decoding them. It never fails: on malformed input it returns
//! what it found before the fault, and the request is forwarded unchanged for
//! the backend to judge.

/// The top-level fields anteroom reads from a request body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fields<'a> {
    /// `priority`, when it is an integer that fits an `i32`.
    pub priority: Option<i32>,
    /// How many top-level `priority` keys there are (whatever their
    /// values), up to 255.
    pub priority_keys: u8,
    /// `model`, the raw bytes between the quotes (escapes left as they are).
    pub model: Option<&'a [u8]>,
    /// `stream`, when it is `true` or `false`.
    pub stream: Option<bool>,
    /// The most tokens to generate: `max_tokens`, `max_completion_tokens`
    /// (chat) or `max_output_tokens` (Responses API), when a whole number.
    pub max_tokens: Option<u64>,
    /// A top-level `stream_options` key is there (whatever its value).
    pub stream_options: bool,
    /// The (last) top-level `messages` is an empty array.
    pub empty_messages: bool,
}

/// Scan `body` for the [`Fields`].
pub fn scan(body: &[u8]) -> Fields<'_> {
    let mut out = Fields::default();
    let _ = scan_into(body, &mut out);
    out
}

/// `body` with the value of every top-level `priority` key replaced by
/// `priority` (for a key whose priority was clamped: the backend must not
/// see the urgency anteroom refused). `None` if it has no such key or is
/// not a JSON object the scanner reads.
pub fn with_priority(body: &[u8], priority: i32) -> Option<Vec<u8>> {
    with_value(body, b"priority", priority.to_string().as_bytes())
}

/// `body` with the value of every top-level `key` replaced by `value` (JSON
/// text). `None` if it has no such key or is not a JSON object the scanner
/// reads.
pub(crate) fn with_value(body: &[u8], name: &[u8], value: &[u8]) -> Option<Vec<u8>> {
    let (spans, _) = value_spans(body, &[name])?;
    splice(body, &spans, value)
}

/// The token fields a generation's length is asked by.
const MAX_TOKENS_KEYS: [&[u8]; 3] = [
    b"max_tokens",
    b"max_completion_tokens",
    b"max_output_tokens",
];

/// `body` asking for at most `n` tokens: every top-level `max_tokens`,
/// `max_completion_tokens` or `max_output_tokens` set to `n`, or, with
/// none, `"max_tokens": n` added first. `None` if it is not a JSON object
/// the scanner reads.
pub(crate) fn with_max_tokens(body: &[u8], n: u64) -> Option<Vec<u8>> {
    let (spans, open) = value_spans(body, &MAX_TOKENS_KEYS)?;
    let value = n.to_string();
    if !spans.is_empty() {
        return splice(body, &spans, value.as_bytes());
    }
    let empty = *body.get(skip_ws(body, open + 1))? == b'}';
    let mut out = Vec::with_capacity(body.len() + 24);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(b"\"max_tokens\":");
    out.extend_from_slice(value.as_bytes());
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(&body[open + 1..]);
    Some(out)
}

/// `body` with each span replaced by `value`; `None` without spans.
fn splice(body: &[u8], spans: &[(usize, usize)], value: &[u8]) -> Option<Vec<u8>> {
    if spans.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + value.len());
    let mut at = 0;
    for &(start, end) in spans {
        out.extend_from_slice(&body[at..start]);
        out.extend_from_slice(value);
        at = end;
    }
    out.extend_from_slice(&body[at..]);
    Some(out)
}

/// Where the values of the top-level keys named in `names` are, and where
/// the object opens; `None` if `body` is not a JSON object the scanner
/// reads to its end.
fn value_spans(body: &[u8], names: &[&[u8]]) -> Option<(Vec<(usize, usize)>, usize)> {
    let mut spans = Vec::new();
    let open = skip_ws(body, 0);
    if *body.get(open)? != b'{' {
        return None;
    }
    let mut i = skip_ws(body, open + 1);
    if *body.get(i)? != b'}' {
        loop {
            if *body.get(i)? != b'"' {
                return None;
            }
            let (key_end, escaped) = key_end(body, i)?;
            let unescaped = escaped.then(|| unescape_key(body, i, key_end)).flatten();
            let key = unescaped.as_deref().unwrap_or(&body[i + 1..key_end]);
            i = skip_ws(body, key_end + 1);
            if *body.get(i)? != b':' {
                return None;
            }
            let start = skip_ws(body, i + 1);
            let end = value_end(body, start)?;
            if names.contains(&key) {
                spans.push((start, end));
            }
            i = skip_ws(body, end);
            match *body.get(i)? {
                b',' => i = skip_ws(body, i + 1),
                b'}' => break,
                _ => return None,
            }
        }
    }
    Some((spans, open))
}

fn scan_into<'a>(b: &'a [u8], out: &mut Fields<'a>) -> Option<()> {
    let mut i = skip_ws(b, 0);
    if *b.get(i)? != b'{' {
        return None;
    }
    i = skip_ws(b, i + 1);
    if *b.get(i)? == b'}' {
        return Some(());
    }
    loop {
        if *b.get(i)? != b'"' {
            return None;
        }
        let (key_end, escaped) = key_end(b, i)?;
        let unescaped;
        let key = match escaped.then(|| unescape_key(b, i, key_end)).flatten() {
            Some(k) => {
                unescaped = k;
                &unescaped[..]
            }
            None => &b[i + 1..key_end],
        };
        i = skip_ws(b, key_end + 1);
        if *b.get(i)? != b':' {
            return None;
        }
        let start = skip_ws(b, i + 1);
        let end = value_end(b, start)?;
        let value = &b[start..end];
        match key {
            b"priority" => {
                out.priority = parse_i32(value);
                out.priority_keys = out.priority_keys.saturating_add(1);
            }
            b"model" if value.first() == Some(&b'"') => {
                out.model = Some(&value[1..value.len() - 1])
            }
            b"max_tokens" | b"max_completion_tokens" | b"max_output_tokens" => {
                if let Some(n) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                    out.max_tokens = Some(n);
                }
            }
            b"stream_options" => out.stream_options = true,
            // The last one counts, as in the backends' parsers.
            b"messages" => {
                out.empty_messages =
                    value.first() == Some(&b'[') && skip_ws(value, 1) + 1 == value.len()
            }
            b"stream" => {
                out.stream = match value {
                    b"true" => Some(true),
                    b"false" => Some(false),
                    _ => None,
                }
            }
            _ => {}
        }
        i = skip_ws(b, end);
        match *b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => return Some(()),
            _ => return None,
        }
    }
}

/// A key spelled with escapes (`"pri\u006frity"`), decoded as the
/// backend's JSON parser decodes it: a client must not hide a field from
/// anteroom that the backend reads. Only for a key with a backslash (nearly
/// none: the others are compared as they are); `None` if it does not decode.
fn unescape_key(b: &[u8], open: usize, close: usize) -> Option<Vec<u8>> {
    let raw = &b[open..=close];
    serde_json::from_slice::<String>(raw)
        .ok()
        .map(String::into_bytes)
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Index of the closing quote of the key that opens at `i`, and whether it
/// holds an escape: found on the same walk, so a plain key costs nothing
/// more than finding its end.
fn key_end(b: &[u8], i: usize) -> Option<(usize, bool)> {
    let mut j = i + 1;
    let mut escaped = false;
    loop {
        match *b.get(j)? {
            b'"' => return Some((j, escaped)),
            b'\\' => {
                escaped = true;
                j += 2;
            }
            _ => j += 1,
        }
    }
}

/// Index of the closing quote of the string that opens at `i`.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match *b.get(j)? {
            b'"' => return Some(j),
            b'\\' => j += 2,
            _ => j += 1,
        }
    }
}

/// Index just past the value that starts at `i`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i).map(|e| e + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match *b.get(j)? {
                    b'"' => j = string_end(b, j)?,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while let Some(&c) = b.get(j) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

fn parse_i32(v: &[u8]) -> Option<i32> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_spelled_with_escapes_are_the_keys_they_spell() {
        let f = super::scan(br#"{"pri\u006frity": -3, "str\u0065am": true, "max_tok\u0065ns": 7}"#);
        assert_eq!(f.priority, Some(-3));
        assert_eq!(f.priority_keys, 1);
        assert_eq!(f.stream, Some(true));
        assert_eq!(f.max_tokens, Some(7));
    }

    #[test]
    fn every_priority_key_gets_the_clamped_value() {
        let cases: [(&[u8], Option<&str>); 6] = [
            (
                br#"{"priority": -1000, "model": "m"}"#,
                Some(r#"{"priority": 5, "model": "m"}"#),
            ),
            (br#"{"priority":"-1000"}"#, Some(r#"{"priority":5}"#)),
            (
                br#"{"priority":-1.0e3,"priority":[1]}"#,
                Some(r#"{"priority":5,"priority":5}"#),
            ),
            (br#"{"model":"m","x":{"priority":-9}}"#, None),
            (br#"not json"#, None),
            (br#"{"priority": -1000"#, None),
        ];
        // A key spelled with escapes is the same key.
        assert_eq!(
            super::with_priority(br#"{"pri\u006frity":-9}"#, 5).as_deref(),
            Some(&br#"{"pri\u006frity":5}"#[..])
        );
        for (body, want) in cases {
            let got = super::with_priority(body, 5).map(|v| String::from_utf8(v).unwrap());
            assert_eq!(got.as_deref(), want, "{}", String::from_utf8_lossy(body));
        }
    }

    use super::*;

    #[test]
    fn finds_top_level_fields() {
        let f = scan(br#"{"model":"llama-3","messages":[{"role":"user","content":"hi"}],"stream":true,"priority":-5}"#);
        assert_eq!(f.priority, Some(-5));
        assert_eq!(f.model, Some(&b"llama-3"[..]));
        assert_eq!(f.stream, Some(true));
        assert_eq!(f.max_tokens, None);
        assert!(scan(br#"{"messages": [ ] }"#).empty_messages);
        assert!(scan(br#"{"messages":[{"role":"user"}],"messages":[]}"#).empty_messages);
        assert!(!scan(br#"{"messages":[],"messages":[{"role":"user"}]}"#).empty_messages);
        assert!(!scan(br#"{"messages":[{}]}"#).empty_messages);
        assert!(!scan(br#"{"x":{"messages":[]}}"#).empty_messages);
        let bounded =
            |b: &str| String::from_utf8(with_max_tokens(b.as_bytes(), 64).unwrap()).unwrap();
        assert_eq!(bounded(r#"{"m":1}"#), r#"{"max_tokens":64,"m":1}"#);
        assert_eq!(bounded(r#" { } "#), r#" {"max_tokens":64 } "#);
        assert_eq!(
            bounded(r#"{"max_tokens":null,"max_completion_tokens": 9000}"#),
            r#"{"max_tokens":64,"max_completion_tokens": 64}"#
        );
        assert_eq!(
            bounded(r#"{"x":{"max_tokens":1}}"#),
            r#"{"max_tokens":64,"x":{"max_tokens":1}}"#
        );
        assert_eq!(with_max_tokens(b"[1]", 64), None);
        assert_eq!(with_max_tokens(br#"{"a":"#, 64), None);
        let f = scan(br#"{"max_tokens":64,"x":{"max_tokens":9}}"#);
        assert_eq!(f.max_tokens, Some(64));
        let f = scan(br#"{"max_completion_tokens": 100, "max_output_tokens": null}"#);
        assert_eq!(f.max_tokens, Some(100));
    }

    #[test]
    fn ignores_nested_fields_of_the_same_name() {
        let f = scan(br#"{"metadata":{"priority":1,"model":"x"},"messages":[{"priority":2}],"priority" : 7 }"#);
        assert_eq!(f.priority, Some(7));
        assert_eq!(f.model, None);
    }

    #[test]
    fn strings_with_braces_quotes_and_escapes_are_skipped_whole() {
        let f = scan(br#"{"prompt":"a \"}\" {[ \\","priority":3}"#);
        assert_eq!(f.priority, Some(3));
    }

    #[test]
    fn non_integer_priority_is_not_a_priority() {
        assert_eq!(scan(br#"{"priority":1.5}"#).priority, None);
        assert_eq!(scan(br#"{"priority":"high"}"#).priority, None);
        assert_eq!(scan(br#"{"priority":99999999999}"#).priority, None);
        assert_eq!(scan(br#"{"priority":null}"#).priority, None);
    }

    #[test]
    fn malformed_input_never_panics_and_keeps_what_came_before() {
        let f = scan(br#"{"priority":4,"messages":[{"#);
        assert_eq!(f.priority, Some(4));
        for input in [
            &b""[..],
            b"{",
            b"[1,2]",
            b"not json",
            b"{\"a",
            b"{\"a\":",
            b"{\"a\":}",
            b"{\"a\":1 \"b\":2}",
            b"\xff\xfe",
            b"{\"priority\":\"\\",
            b"}}}",
            b"{\"a\":]}",
        ] {
            let _ = scan(input);
        }
    }

    #[test]
    fn last_occurrence_wins_like_serde_json_would_reject_or_take() {
        // Duplicate keys are not valid for most servers; we take the last one
        // as JavaScript's JSON.parse does.
        assert_eq!(scan(br#"{"priority":1,"priority":2}"#).priority, Some(2));
    }
}
