//! A model the backend names otherwise than clients do (`{ name =
//! "llama-3-8b", backend = "rig" }` in an upstream's `models`): `model`
//! is rewritten in the request on the way up, and back in the answer on
//! the way down, streamed or not, so a client asks for and reads the same
//! name whatever serves it.
//!
//! The answer is rewritten as bytes: every `"model":"rig"` (any blanks
//! around the colon) becomes `"model":"llama-3-8b"`. In JSON that text can
//! only be a key and its value: inside a string its quotes would be
//! escaped. Names are checked at load to need no escapes, so the bytes
//! compared are the ones a backend writes.

use std::sync::Arc;

use bytes::Bytes;
use memchr::memmem;

use crate::config::Models;

/// An upstream's aliases: client-facing name → the backend's.
#[derive(Debug)]
pub struct Aliases(Box<[Alias]>);

#[derive(Debug)]
struct Alias {
    client: Box<str>,
    /// Both as JSON strings, quotes included.
    client_json: Bytes,
    backend_json: Bytes,
}

fn json_string(s: &str) -> Bytes {
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
    Bytes::from(out)
}

impl Aliases {
    /// The aliases among `models`, if any.
    pub fn of(models: &Models) -> Option<Arc<Self>> {
        let list: Box<[Alias]> = models
            .named()
            .filter(|m| m.is_alias())
            .map(|m| Alias {
                client: m.name.as_str().into(),
                client_json: json_string(&m.name),
                backend_json: json_string(m.backend_name()),
            })
            .collect();
        (!list.is_empty()).then(|| Arc::new(Self(list)))
    }

    /// For a request that asks for `model` (the raw text between its
    /// quotes): the backend's name as a JSON string, and the rewriting of
    /// its answer.
    pub fn find(&self, model: &str) -> Option<(Bytes, Rename)> {
        let a = self.0.iter().find(|a| &*a.client == model)?;
        Some((
            a.backend_json.clone(),
            Rename {
                from: a.backend_json.clone(),
                to: a.client_json.clone(),
                carry: Vec::new(),
            },
        ))
    }
}

/// The rewriting of one answer's `model`, fed its body piece by piece.
#[derive(Debug)]
pub struct Rename {
    /// The backend's name and the client's, as JSON strings.
    from: Bytes,
    to: Bytes,
    /// The end of the last piece, when it may be the start of a
    /// `"model":"…"` the next piece completes.
    carry: Vec<u8>,
}

const KEY: &[u8] = b"\"model\"";
/// The most blanks read around the colon: past them it is not a match
/// (what is held back stays bounded).
const MAX_BLANKS: usize = 32;

impl Rename {
    /// What of the body so far goes on now: `data` rewritten, less an end
    /// that may be the start of a match (held for the next piece).
    pub fn feed(&mut self, data: Bytes) -> Bytes {
        let finder = memmem::Finder::new(KEY);
        if self.carry.is_empty() {
            // The usual piece: nothing near the name, passed on as it is.
            if finder.find(&data).is_none() && tail_of_key(&data) == 0 {
                return data;
            }
            return self.rewrite(&data, &finder);
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(&data);
        self.rewrite(&buf, &finder)
    }

    /// What was held back, at the body's end.
    pub fn finish(&mut self) -> Option<Bytes> {
        (!self.carry.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.carry)))
    }

    /// Whether anything is held back.
    pub fn holds(&self) -> bool {
        !self.carry.is_empty()
    }

    fn rewrite(&mut self, buf: &[u8], finder: &memmem::Finder<'_>) -> Bytes {
        let mut out = Vec::with_capacity(buf.len() + 16);
        let mut emitted = 0;
        let mut at = 0;
        let safe = loop {
            let Some(p) = finder.find(&buf[at..]).map(|p| p + at) else {
                break buf.len() - tail_of_key(&buf[at..]);
            };
            match self.value_at(buf, p + KEY.len()) {
                Match::Yes(start) => {
                    out.extend_from_slice(&buf[emitted..start]);
                    out.extend_from_slice(&self.to);
                    emitted = start + self.from.len();
                    at = emitted;
                }
                Match::No => at = p + 1,
                Match::Maybe => break p,
            }
        };
        out.extend_from_slice(&buf[emitted..safe.max(emitted)]);
        self.carry = buf[safe.max(emitted)..].to_vec();
        Bytes::from(out)
    }

    /// After a `"model"` key ending at `i`: whether the backend's name is
    /// its value (where it starts), is not, or may be once more comes.
    fn value_at(&self, buf: &[u8], i: usize) -> Match {
        let blanks = |mut i: usize| {
            let start = i;
            while i < buf.len()
                && i - start <= MAX_BLANKS
                && matches!(buf[i], b' ' | b'\t' | b'\r' | b'\n')
            {
                i += 1;
            }
            (i, i - start > MAX_BLANKS)
        };
        let (i, too_many) = blanks(i);
        if too_many {
            return Match::No;
        }
        match buf.get(i) {
            None => return Match::Maybe,
            Some(b':') => {}
            Some(_) => return Match::No,
        }
        let (i, too_many) = blanks(i + 1);
        if too_many {
            return Match::No;
        }
        let rest = &buf[i..];
        if rest.len() < self.from.len() {
            return match self.from.starts_with(rest) {
                true => Match::Maybe,
                false => Match::No,
            };
        }
        match rest.starts_with(&self.from) {
            true => Match::Yes(i),
            false => Match::No,
        }
    }
}

enum Match {
    Yes(usize),
    No,
    Maybe,
}

/// How long an end of `buf` is that starts the key (and may be completed).
fn tail_of_key(buf: &[u8]) -> usize {
    (1..KEY.len())
        .rev()
        .find(|&k| buf.len() >= k && buf[buf.len() - k..] == KEY[..k])
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelName;

    fn aliases() -> Arc<Aliases> {
        Aliases::of(&Models::List(vec![
            "plain".into(),
            ModelName {
                name: "llama-3-8b".into(),
                backend: Some("rig".into()),
            },
        ]))
        .expect("one alias")
    }

    /// `pieces` through a rename, all of it.
    fn through(pieces: &[&str]) -> String {
        let (_, mut r) = aliases().find("llama-3-8b").expect("aliased");
        let mut out = Vec::new();
        for p in pieces {
            out.extend_from_slice(&r.feed(Bytes::copy_from_slice(p.as_bytes())));
        }
        out.extend_from_slice(&r.finish().unwrap_or_default());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn only_aliases_are_kept_and_found() {
        let a = aliases();
        assert!(a.find("plain").is_none(), "a plain name is sent as it is");
        let (backend, _) = a.find("llama-3-8b").unwrap();
        assert_eq!(&backend[..], b"\"rig\"");
        assert!(Aliases::of(&Models::Any).is_none());
        assert!(Aliases::of(&Models::List(vec!["a".into()])).is_none());
    }

    #[test]
    fn the_answer_says_the_client_s_name() {
        let json = r#"{"id":"x","model":"rig","choices":[{"message":{"content":"the \"model\":\"rig\" stays"}}]}"#;
        assert_eq!(
            through(&[json]),
            r#"{"id":"x","model":"llama-3-8b","choices":[{"message":{"content":"the \"model\":\"rig\" stays"}}]}"#
        );
        // Blanks around the colon (a pretty-printing backend).
        assert_eq!(
            through(&["{\"model\" : \"rig\"}"]),
            "{\"model\" : \"llama-3-8b\"}"
        );
        // Another value, or a longer name, is not its name.
        for other in [
            r#"{"model":"rig-2"}"#,
            r#"{"model":"other"}"#,
            r#"{"models":"rig"}"#,
            r#"["model","rig"]"#,
        ] {
            assert_eq!(through(&[other]), other);
        }
    }

    #[test]
    fn a_name_split_between_pieces_is_rewritten_whatever_the_split() {
        let events =
            "data: {\"model\":\"rig\",\"x\":1}\n\ndata: {\"model\":\"rig\"}\n\ndata: [DONE]\n\n";
        let want = events.replace("\"rig\"", "\"llama-3-8b\"");
        for cut in 0..=events.len() {
            let (a, b) = events.split_at(cut);
            assert_eq!(through(&[a, b]), want, "cut at {cut}");
        }
        // Byte by byte.
        let bytes: Vec<String> = events.chars().map(String::from).collect();
        let pieces: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(through(&pieces), want);
    }

    #[test]
    fn what_is_held_back_is_bounded_and_given_at_the_end() {
        let (_, mut r) = aliases().find("llama-3-8b").unwrap();
        // A piece that ends in the middle of a possible match is held.
        let out = r.feed(Bytes::from_static(b"data: {\"model\":\"ri"));
        assert_eq!(&out[..], b"data: {");
        assert!(r.holds());
        // A body that ends there gets it as it came.
        assert_eq!(&r.finish().unwrap()[..], b"\"model\":\"ri");
        // Blanks past the bound are no match: nothing waits on them.
        let (_, mut r) = aliases().find("llama-3-8b").unwrap();
        let spaced = format!("{{\"model\"{}", " ".repeat(MAX_BLANKS + 5));
        assert_eq!(r.feed(Bytes::from(spaced.clone())), spaced.as_bytes());
        assert!(!r.holds());
        // A piece with nothing near the name is passed on as it is.
        let (_, mut r) = aliases().find("llama-3-8b").unwrap();
        let piece = Bytes::from_static(b"data: {\"choices\":[]}\n\n");
        let out = r.feed(piece.clone());
        assert_eq!(out.as_ptr(), piece.as_ptr(), "not copied");
    }
}
