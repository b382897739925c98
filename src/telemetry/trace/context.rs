//! W3C Trace Context: the `traceparent` a client sends, read; the one the
//! upstream gets, written.
//!
//! <https://www.w3.org/TR/trace-context/>: `version-traceid-parentid-flags`,
//! lowercase hex. A header that does not parse (or comes twice) is ignored
//! and the request starts a trace of its own, as the specification asks.

use http::{HeaderMap, HeaderValue};

/// The `traceparent` header.
pub(crate) const TRACEPARENT: &str = "traceparent";
/// The `tracestate` header.
pub(crate) const TRACESTATE: &str = "tracestate";

/// The longest `tracestate` kept on the span (the specification asks that
/// at least 512 characters be propagated; the header itself passes through
/// whole).
const MAX_TRACESTATE: usize = 512;

/// A client's trace context: the trace its request belongs to, and its
/// span (the parent of anteroom's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Parent {
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: [u8; 8],
    /// The client sampled its trace.
    pub(crate) sampled: bool,
    /// Its `tracestate`, if any (and not too long to keep).
    pub(crate) state: Option<String>,
}

impl Parent {
    /// The client's trace context, if its headers carry a valid one.
    pub(crate) fn of(headers: &HeaderMap) -> Option<Self> {
        let mut all = headers.get_all(TRACEPARENT).iter();
        let value = all.next()?;
        if all.next().is_some() {
            return None;
        }
        let (trace_id, span_id, flags) = parse(value.as_bytes())?;
        let mut state = String::new();
        for v in headers.get_all(TRACESTATE) {
            let Ok(v) = v.to_str() else {
                state.clear();
                break;
            };
            let v = v.trim();
            if v.is_empty() {
                continue;
            }
            if !state.is_empty() {
                state.push(',');
            }
            state.push_str(v);
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
            state: (!state.is_empty() && state.len() <= MAX_TRACESTATE).then_some(state),
        })
    }
}

/// `traceparent`'s trace id, parent id and flags.
fn parse(v: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex::<1>(&v[0..2])?[0];
    // Version 0 is exactly 55 bytes; a later one may add fields after a
    // dash, which are not read. 0xff is never valid.
    match version {
        0 if v.len() != 55 => return None,
        0xff => return None,
        _ if v.len() > 55 && v[55] != b'-' => return None,
        _ => {}
    }
    let trace_id = hex::<16>(&v[3..35])?;
    let span_id = hex::<8>(&v[36..52])?;
    let flags = hex::<1>(&v[53..55])?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some((trace_id, span_id, flags))
}

/// `N` bytes from `2N` lowercase hex digits.
fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate().take(N) {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// The `traceparent` that makes `span_id` of `trace_id` the parent.
pub(crate) fn traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool) -> HeaderValue {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = *b"00-________________________________-________________-01";
    let hex_into = |out: &mut [u8], bytes: &[u8]| {
        for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 0xf)];
        }
    };
    hex_into(&mut out[3..35], trace_id);
    hex_into(&mut out[36..52], span_id);
    if !sampled {
        out[54] = b'0';
    }
    match HeaderValue::from_bytes(&out) {
        Ok(v) => v,
        Err(_) => unreachable!("hex digits and dashes are a valid header value"),
    }
}

/// Lowercase hex of `bytes` (ids in tests and logs).
#[cfg(test)]
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const GOOD: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_valid_traceparent_and_its_tracestate_are_read() {
        let p = Parent::of(&headers(&[
            (TRACEPARENT, GOOD),
            (TRACESTATE, "congo=t61rcWkgMzE"),
            (TRACESTATE, "rojo=00f067aa0ba902b7"),
        ]))
        .expect("valid");
        assert_eq!(to_hex(&p.trace_id), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(to_hex(&p.span_id), "b7ad6b7169203331");
        assert!(p.sampled);
        assert_eq!(
            p.state.as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        let unsampled = GOOD.replace("-01", "-00");
        assert!(
            !Parent::of(&headers(&[(TRACEPARENT, &unsampled)]))
                .unwrap()
                .sampled
        );
    }

    #[test]
    fn an_invalid_traceparent_is_ignored() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "0g-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert_eq!(Parent::of(&headers(&[(TRACEPARENT, bad)])), None, "{bad:?}");
        }
        // Twice is invalid too.
        assert_eq!(
            Parent::of(&headers(&[(TRACEPARENT, GOOD), (TRACEPARENT, GOOD)])),
            None
        );
        // A later version may carry more after a dash.
        let later = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-xyz";
        assert!(Parent::of(&headers(&[(TRACEPARENT, later)])).is_some());
    }

    #[test]
    fn the_written_traceparent_reads_back() {
        let trace = [0xab; 16];
        let span = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
        let v = traceparent(&trace, &span, true);
        assert_eq!(
            v.to_str().unwrap(),
            "00-abababababababababababababababab-0123456789abcdef-01"
        );
        let p = Parent::of(&headers(&[(TRACEPARENT, v.to_str().unwrap())])).unwrap();
        assert_eq!((p.trace_id, p.span_id, p.sampled), (trace, span, true));
        let v = traceparent(&trace, &span, false);
        assert!(v.to_str().unwrap().ends_with("-00"));
    }
}
