//! Token counts from the backend for streams that did not ask for them.
//!
//! A streamed chat or text completion reports its `usage` only if the
//! client sends `"stream_options": {"include_usage": true}`; without it
//! anteroom can only count content events, and vLLM's fall short of its
//! tokens (294–299 for 300). So for a vLLM upstream (`stream_usage`, on by
//! default) anteroom adds `"stream_options":{"include_usage":true}` to a
//! streamed request that has no `stream_options` of its own, and takes out
//! of the answer the one event that asking added: the last chunk, with no
//! choices and the `usage` ([`Strip`]). The client's bytes are the ones it
//! would have got; the usage goes to the record.
//!
//! Only vLLM: it writes the other chunks the same with and without the
//! option (OpenAI adds `"usage":null` to every chunk, llama-server moves
//! its `timings` to the usage chunk, and llama.cpp's timings count its
//! tokens anyway). A request whose `stream_options` the client wrote is
//! left as it is.

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;

use crate::telemetry::observe::{scan_event, Usage};

/// Most bytes of one event held back while it is incomplete; past it the
/// event goes on as it is (no usage chunk is that long).
const MAX_HELD: usize = 64 * 1024;

/// The end of an event, and the mark of a usage-only one: searchers built
/// once (building one costs more than a search of a whole event).
static EVENT_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
static NO_CHOICES: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"choices\":[]"));

/// Takes the usage-only event out of an SSE stream (see the module docs),
/// handing the stream on otherwise unchanged. Events end with a blank line
/// (`\n\n`, as vLLM writes them); a frame that ends inside an event keeps
/// that part until the rest comes.
#[derive(Debug, Default)]
pub struct Strip {
    /// The start of an event whose end has not come yet.
    held: BytesMut,
    /// The usage event was taken out: the rest passes untouched.
    done: bool,
    usage: Option<Usage>,
}

impl Strip {
    /// What of `data` goes on now (possibly empty: all of it is held, or
    /// it was the usage event).
    pub fn pass(&mut self, data: Bytes) -> Bytes {
        if self.held.is_empty()
            && (self.done || (data.ends_with(b"\n\n") && NO_CHOICES.find(&data).is_none()))
        {
            // Whole events, none of them the usage one (every frame of a
            // vLLM stream but one): one search, no split.
            return data;
        }
        let buf = if self.held.is_empty() {
            data
        } else {
            self.held.extend_from_slice(&data);
            self.held.split().freeze()
        };
        let mut at = 0;
        while let Some(n) = EVENT_END.find(&buf[at..]) {
            let end = at + n + 2;
            if !self.done {
                if let Some(usage) = usage_only(&buf[at..end]) {
                    self.usage = Some(usage);
                    self.done = true;
                    let mut out = BytesMut::with_capacity(buf.len() - (end - at));
                    out.extend_from_slice(&buf[..at]);
                    out.extend_from_slice(&buf[end..]);
                    // What follows (`[DONE]`) is never held.
                    return out.freeze();
                }
            }
            at = end;
        }
        // A frame of whole events (as vLLM writes them, one a frame) goes
        // on as it came: no copy, no slice.
        if self.done || at == buf.len() || buf.len() - at > MAX_HELD {
            return buf;
        }
        // An event begun: hold it until its end.
        self.held.extend_from_slice(&buf[at..]);
        buf.slice(..at)
    }

    /// At the end of the stream (or its failure): what is still held.
    pub fn flush(&mut self) -> Option<Bytes> {
        (!self.held.is_empty()).then(|| self.held.split().freeze())
    }

    /// The usage of the event taken out, if one was.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// That usage, the first time it is asked for after the event was
    /// taken out; `None` after.
    pub(crate) fn take_usage(&mut self) -> Option<Usage> {
        self.usage.take()
    }
}

/// The usage of one event if it is the chunk asking for usage added: a
/// `data:` line with an empty `choices` array and a `usage` object.
fn usage_only(event: &[u8]) -> Option<Usage> {
    let line = event.trim_ascii_end();
    let payload = line.strip_prefix(b"data:")?.trim_ascii();
    if memchr::memchr(b'\n', payload).is_some() || NO_CHOICES.find(payload).is_none() {
        return None;
    }
    let mut usage = Usage::default();
    scan_event(payload, &mut usage);
    usage.completion_tokens.is_some().then_some(usage)
}

/// `body` asking for usage: `"stream_options":{"include_usage":true}` as
/// its first field. `None` if it is not a JSON object.
pub fn ask(body: &[u8]) -> Option<Vec<u8>> {
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let rest = &body[open + 1..];
    let empty = rest.trim_ascii_start().first() == Some(&b'}');
    const FIELD: &[u8] = br#""stream_options":{"include_usage":true}"#;
    let mut out = Vec::with_capacity(body.len() + FIELD.len() + 1);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(FIELD);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n";
    const USAGE: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"total_tokens\":10,\"completion_tokens\":3}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn through(strip: &mut Strip, frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&strip.pass(Bytes::copy_from_slice(f)));
        }
        if let Some(rest) = strip.flush() {
            out.extend_from_slice(&rest);
        }
        out
    }

    #[test]
    fn the_usage_event_is_taken_out_however_the_frames_fall() {
        let with = format!("{TOKEN}{TOKEN}{USAGE}{DONE}");
        let without = format!("{TOKEN}{TOKEN}{DONE}");
        let want = Usage {
            prompt_tokens: Some(7),
            completion_tokens: Some(3),
        };
        // One event a frame, all in one, and split at every byte.
        let per_event: Vec<&[u8]> = [TOKEN, TOKEN, USAGE, DONE].map(str::as_bytes).to_vec();
        let bytes: Vec<&[u8]> = with.as_bytes().chunks(1).collect();
        let sevens: Vec<&[u8]> = with.as_bytes().chunks(7).collect();
        for frames in [per_event, vec![with.as_bytes()], bytes, sevens] {
            let mut strip = Strip::default();
            assert_eq!(through(&mut strip, &frames), without.as_bytes());
            assert_eq!(strip.usage(), Some(want));
        }
    }

    #[test]
    fn a_stream_without_a_usage_event_passes_unchanged() {
        let body = format!("{TOKEN}{TOKEN}{DONE}");
        let mut strip = Strip::default();
        let frames: Vec<&[u8]> = body.as_bytes().chunks(5).collect();
        assert_eq!(through(&mut strip, &frames), body.as_bytes());
        assert_eq!(strip.usage(), None);
        // A stream cut mid-event: what came is handed on at the end.
        let mut strip = Strip::default();
        let cut = &TOKEN.as_bytes()[..20];
        assert_eq!(through(&mut strip, &[cut]), cut);
        // Only the first usage event is taken (a second is the backend's).
        let twice = format!("{TOKEN}{USAGE}{USAGE}{DONE}");
        let mut strip = Strip::default();
        assert_eq!(
            through(&mut strip, &[twice.as_bytes()]),
            format!("{TOKEN}{USAGE}{DONE}").as_bytes()
        );
    }

    #[test]
    fn asking_adds_the_option_as_the_first_field() {
        assert_eq!(
            ask(br#" {"stream":true,"model":"m"}"#).unwrap(),
            br#" {"stream_options":{"include_usage":true},"stream":true,"model":"m"}"#
        );
        assert_eq!(
            ask(b"{ }").unwrap(),
            br#"{"stream_options":{"include_usage":true} }"#
        );
        assert_eq!(ask(b"[1]"), None);
        assert_eq!(ask(b""), None);
        let v: serde_json::Value =
            serde_json::from_slice(&ask(br#"{"stream":true}"#).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }
}
