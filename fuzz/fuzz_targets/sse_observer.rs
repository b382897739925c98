//! The SSE observer on any bytes, cut into frames anywhere: no panic, and
//! its counts hang together (token and malformed events are events; the
//! same bytes cut differently count the same).
#![no_main]

use anteroom::telemetry::{Framing, Observer};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fn observe(chunks: &[&[u8]]) -> (u32, u32, u32, bool, u32) {
    let mut o = Observer::new(Framing::Sse);
    let mut completed = 0;
    for c in chunks {
        completed += o.feed(&Bytes::copy_from_slice(c));
    }
    let partial = o.finish();
    assert!(o.token_events <= o.events);
    assert!(o.malformed <= o.events);
    (o.events, o.token_events, o.malformed, partial, completed)
}

fuzz_target!(|input: (u16, &[u8])| {
    let (cut, bytes) = input;
    let whole = observe(&[bytes]);
    let at = usize::from(cut) % (bytes.len() + 1);
    let split = observe(&[&bytes[..at], &bytes[at..]]);
    // Where a frame is cut does not change what is counted (the 1 MiB
    // line bound is far past what a fuzz input holds).
    assert_eq!((whole.0, whole.1, whole.2), (split.0, split.1, split.2));
    assert!(whole.4 <= whole.1 && split.4 <= split.1);
    let mut json = Observer::new(Framing::Json);
    json.feed(&Bytes::copy_from_slice(bytes));
    json.finish();
});
