//! What anteroom changes in a stream, on any bytes cut into two frames
//! anywhere: the usage strip hands on every byte but the one usage event
//! (the same bytes however the frames fall; all of them when there is no
//! event with empty choices), and putting an upgraded answer back together
//! never panics and gives JSON or an error.
#![no_main]

use anteroom::types::Shape;
use anteroom::upstream::upgrade::Assembler;
use anteroom::upstream::usage::Strip;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fn strip(frames: &[&[u8]]) -> Vec<u8> {
    let mut s = Strip::default();
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&s.pass(Bytes::copy_from_slice(f)));
    }
    if let Some(rest) = s.flush() {
        out.extend_from_slice(&rest);
    }
    out
}

fuzz_target!(|input: (u16, bool, &[u8])| {
    let (cut, chat, bytes) = input;
    let whole = strip(&[bytes]);
    let at = usize::from(cut) % (bytes.len() + 1);
    assert_eq!(whole, strip(&[&bytes[..at], &bytes[at..]]));
    assert!(whole.len() <= bytes.len());
    if memchr::memmem::find(bytes, b"\"choices\":[]").is_none() {
        assert_eq!(whole, bytes);
    }
    let mut a = Assembler::new(if chat { Shape::Chat } else { Shape::Text });
    for line in bytes.split(|b| *b == b'\n') {
        if let Some(payload) = line.strip_prefix(b"data:") {
            a.event(payload);
        }
    }
    if let Ok(json) = a.finish() {
        assert!(serde_json::from_slice::<serde_json::Value>(&json).is_ok());
    }
});
