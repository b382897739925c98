//! The request-body scanner against serde_json: on every body serde_json
//! reads as a JSON object, the scanner finds the same top-level `priority`,
//! `stream`, `max_tokens` (the last of its spellings) and `model` (when the
//! model name has no escapes, which the scanner leaves as they are), with
//! the last of duplicate keys winning as in serde_json and Python. On any
//! other input it must not panic. `with_priority` rewrites to a body
//! serde_json reads with that priority and the other fields unchanged.
#![no_main]

use std::fmt;

use libfuzzer_sys::fuzz_target;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// A top-level object's entries, in document order (duplicates kept).
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn last<'a>(e: &'a Entries, names: &[&str]) -> Option<&'a Value> {
    e.0.iter()
        .rev()
        .find(|(k, _)| names.contains(&k.as_str()))
        .map(|(_, v)| v)
}

fuzz_target!(|body: &[u8]| {
    let fields = anteroom::json_scan::scan(body);
    let Ok(entries) = serde_json::from_slice::<Entries>(body) else {
        let _ = anteroom::json_scan::with_priority(body, 5);
        return;
    };
    let priority = last(&entries, &["priority"])
        .and_then(Value::as_i64)
        .and_then(|p| i32::try_from(p).ok());
    // serde_json reads `1.0` as a float; so does the scanner (not an i32).
    assert_eq!(fields.priority, priority, "priority");
    let keys = entries.0.iter().filter(|(k, _)| k == "priority").count();
    assert_eq!(
        usize::from(fields.priority_keys),
        keys.min(255),
        "priority keys"
    );
    assert_eq!(
        fields.stream,
        last(&entries, &["stream"]).and_then(Value::as_bool),
        "stream"
    );
    let max = last(
        &entries,
        &["max_tokens", "max_completion_tokens", "max_output_tokens"],
    );
    match max.and_then(Value::as_u64) {
        Some(n) => assert_eq!(fields.max_tokens, Some(n), "max_tokens"),
        // The scanner keeps an earlier whole number when the last spelling
        // is not one; serde_json's last then says nothing.
        None => {}
    }
    if let Some(Value::String(m)) = last(&entries, &["model"]) {
        if let Some(raw) = fields.model {
            if !raw.contains(&b'\\') {
                assert_eq!(raw, m.as_bytes(), "model");
            }
        }
    }
    if let Some(rewritten) = anteroom::json_scan::with_priority(body, 5) {
        let again: Entries = serde_json::from_slice(&rewritten).expect("a rewritten body is JSON");
        assert_eq!(again.0.len(), entries.0.len());
        for ((k, v), (k2, v2)) in entries.0.iter().zip(&again.0) {
            assert_eq!(k, k2);
            if k == "priority" {
                assert_eq!(v2, &Value::from(5));
            } else {
                assert_eq!(v, v2);
            }
        }
    } else {
        assert_eq!(keys, 0, "a body with a priority is rewritten");
    }
});
