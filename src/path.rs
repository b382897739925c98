//! A request path as a backend might read it, so that admission cannot be
//! skipped by spelling an endpoint differently.
//!
//! Admission matches its endpoints as exact strings, which is cheap and
//! forwards the path byte for byte. But the servers behind anteroom are
//! lenient readers: Starlette (vLLM) decodes `%63` into `c` before routing,
//! Go's mux (Ollama) cleans `//` and `..`, Express (LM Studio's kind of
//! server) ignores case and a trailing slash. A path that is *not* an
//! admitted endpoint as written, but *is* one once read that way, would reach
//! the model past the queue, the cap and every limit. [`normal_form`] is
//! that most lenient reading; the classifier refuses such a path with a 400
//! naming the endpoint's own spelling, rather than guess which reading the
//! backend makes or rewrite what the client sent.

/// `path` read leniently: `%XX` escapes decoded (once, as servers do; `%2F`
/// too), `\` taken as `/`, repeated slashes merged, `.` and `..` segments
/// resolved, a trailing slash dropped, ASCII letters lowered. Bytes, not a
/// string: a decoded escape need not be UTF-8.
pub fn normal_form(path: &str) -> Vec<u8> {
    let raw = path.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' && i + 2 < raw.len() {
            if let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                decoded.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        decoded.push(b);
        i += 1;
    }
    let mut out: Vec<u8> = Vec::with_capacity(decoded.len() + 1);
    // Start offsets in `out` of the segments kept, for `..`.
    let mut starts: Vec<usize> = Vec::new();
    for segment in decoded.split(|&b| b == b'/' || b == b'\\') {
        match segment {
            b"" | b"." => {}
            b".." => {
                if let Some(start) = starts.pop() {
                    out.truncate(start);
                }
            }
            s => {
                starts.push(out.len());
                out.push(b'/');
                out.extend(s.iter().map(u8::to_ascii_lowercase));
            }
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A quick check that `path` is in normal form as it is ([`normal_form`]
/// would give back the same bytes): one pass, no allocation, what every
/// request that is not an endpoint pays. `false` only means "maybe not"
/// (`/.well-known` is normal but not plain enough for it).
pub fn is_plain(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') || (b.len() > 1 && b.ends_with(b"/")) {
        return false;
    }
    let mut prev = 0u8;
    for &c in b {
        let odd = match c {
            b'%' | b'\\' | b'A'..=b'Z' => true,
            b'/' | b'.' => prev == b'/',
            _ => false,
        };
        if odd {
            return false;
        }
        prev = c;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nf(p: &str) -> String {
        String::from_utf8(normal_form(p)).unwrap()
    }

    #[test]
    fn every_lenient_reading_of_an_endpoint_comes_to_the_same_form() {
        for p in [
            "/v1/chat/completions",
            "/v1/chat/%63ompletions",
            "/v1/chat/%63OMPLETIONS",
            "/v1/chat/completions/",
            "//v1/chat/completions",
            "/v1//chat///completions",
            "/v1/x/../chat/completions",
            "/v1/./chat/completions",
            "/v1/chat%2Fcompletions",
            "/v1/chat%2fcompletions",
            "/v1\\chat\\completions",
            "/V1/Chat/Completions",
            "/v1/chat/%2e/completions",
            "/v1/chat/x/%2e%2e/completions",
            "/../v1/chat/completions",
        ] {
            assert_eq!(nf(p), "/v1/chat/completions", "{p}");
        }
    }

    #[test]
    fn other_paths_keep_their_own_form() {
        assert_eq!(nf("/"), "/");
        assert_eq!(nf(""), "/");
        assert_eq!(nf("/.."), "/");
        assert_eq!(nf("/v1/models"), "/v1/models");
        assert_eq!(nf("/v1/chat/completionsx"), "/v1/chat/completionsx");
        // An escape that is not one is kept as written; decoding is once.
        assert_eq!(nf("/a%zz"), "/a%zz");
        assert_eq!(nf("/a%2"), "/a%2");
        assert_eq!(nf("/a%"), "/a%");
        assert_eq!(nf("/a%252e"), "/a%2e");
        assert_eq!(normal_form("/a%ff"), b"/a\xff");
    }

    #[test]
    fn plain_paths_are_normal_and_odd_ones_are_looked_at() {
        for p in ["/v1/chat/completions", "/", "/v1/models/m.gguf", "/a-b_c~d"] {
            assert!(is_plain(p), "{p}");
            assert_eq!(normal_form(p), p.as_bytes(), "{p}");
        }
        for p in [
            "/v1/chat/",
            "//v1",
            "/v1/./x",
            "/v1/.",
            "/.hidden",
            "/V1",
            "/a%61",
            "v1",
            "",
            "/a\\b",
        ] {
            assert!(!is_plain(p), "{p}");
        }
    }
}
