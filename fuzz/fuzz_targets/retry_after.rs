//! An upstream's advice, any bytes in either header: no panic, and what is
//! read back is a wait (finite for milliseconds that fit, never negative).
#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], &[u8])| {
    let (ms, secs) = input;
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(ms) {
        let _ = anteroom::backoff::retry_after::millis(&v);
        h.insert("retry-after-ms", v);
    }
    if let Ok(v) = HeaderValue::from_bytes(secs) {
        let _ = anteroom::backoff::retry_after::seconds_or_date(&v);
        h.insert(http::header::RETRY_AFTER, v);
    }
    if let Some(d) = anteroom::backoff::retry_after::parse(&h) {
        // What anteroom would say in turn is always sayable.
        let (s, m) = anteroom::error::retry_after_values(d);
        assert!(s >= 1 && m >= 1);
    }
});
