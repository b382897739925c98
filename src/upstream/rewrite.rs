//! Header and URI rewriting between client and upstream.

use crate::origin::Origin;
use crate::types::ClientAddr;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Is this a hop-by-hop header (RFC 9110 §7.6.1, plus the non-standard
/// `keep-alive` and `proxy-connection` that clients still send)?
fn is_hop_by_hop(name: &HeaderName) -> bool {
    // Standard names compare as enum values; the two others by string.
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// Remove hop-by-hop headers, including those the `Connection` header names.
/// Most requests carry none: one pass over the names finds that out, without
/// a hash lookup per hop-by-hop name.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Every `Connection` header counts, not just the first (a list may be
    // split over several lines).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    // A message with both framings was framed by Transfer-Encoding (RFC
    // 9112 §6.3): its Content-Length is wrong, and would re-frame the
    // message on the next hop (truncating it, or smuggling the rest).
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
}

/// Point the request at the upstream and set the forwarding headers.
pub fn request<B>(req: &mut Request<B>, origin: &Origin) {
    let uri = origin.uri_for(req.uri().path_and_query());
    *req.uri_mut() = uri;
    // The upstream connection is HTTP/1.1 whatever the client spoke.
    *req.version_mut() = Version::HTTP_11;
    let (client_ip, proto) = match req.extensions().get::<ClientAddr>() {
        Some(c) => (Some(c.ip().clone()), c.proto().clone()),
        None => (None, HeaderValue::from_static("http")),
    };
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    // The client's Host named us; the upstream gets its own, and the
    // original travels as x-forwarded-host.
    if let Some(host) = headers.insert(header::HOST, origin.host_header().clone()) {
        headers.insert(X_FORWARDED_HOST, host);
    }
    if let Some(ip) = client_ip {
        match headers.entry(X_FORWARDED_FOR) {
            header::Entry::Vacant(v) => {
                v.insert(ip);
            }
            header::Entry::Occupied(mut o) => {
                let mut joined = o.get().as_bytes().to_vec();
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(ip.as_bytes());
                if let Ok(v) = HeaderValue::from_bytes(&joined) {
                    o.insert(v);
                }
            }
        }
    }
    headers.insert(X_FORWARDED_PROTO, proto);
    if let Some(auth) = origin.authorization() {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
}

/// Clean the upstream's response for the client.
pub fn response<B>(resp: &mut Response<B>) {
    strip_hop_by_hop(resp.headers_mut());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_path_and_query_and_replaces_the_origin() {
        let o = Origin::parse("http://127.0.0.1:1234").unwrap();
        let mut req = Request::builder()
            .uri("http://evil.example/v1/chat/completions?x=1")
            .header("host", "evil.example")
            .body(())
            .unwrap();
        request(&mut req, &o);
        assert_eq!(req.uri().to_string(), "/v1/chat/completions?x=1");
        assert_eq!(req.headers()["host"], "127.0.0.1:1234");
        assert_eq!(req.headers()["x-forwarded-host"], "evil.example");
    }

    #[test]
    fn applies_a_path_prefix() {
        let o = Origin::parse("http://h:8000/base/").unwrap();
        let mut req = Request::builder().uri("/v1/models").body(()).unwrap();
        request(&mut req, &o);
        assert_eq!(req.uri().to_string(), "/base/v1/models");
        assert_eq!(req.headers()["host"], "h:8000");
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let o = Origin::parse("http://h:1").unwrap();
        let mut req = Request::builder()
            .uri("/")
            .header("connection", "keep-alive, x-secret-hop")
            .header("x-secret-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("proxy-authorization", "Basic abc")
            .header("authorization", "Bearer kept")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(ClientAddr::new("10.1.2.3:5555".parse().unwrap()));
        request(&mut req, &o);
        let h = req.headers();
        for gone in [
            "connection",
            "x-secret-hop",
            "keep-alive",
            "te",
            "proxy-authorization",
        ] {
            assert!(h.get(gone).is_none(), "{gone} should be removed");
        }
        assert_eq!(h["authorization"], "Bearer kept");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn every_connection_header_counts_and_chunked_framing_drops_a_length() {
        let mut resp = Response::builder()
            .header("connection", "keep-alive")
            .header("connection", "x-second-hop")
            .header("x-second-hop", "1")
            .header("transfer-encoding", "chunked")
            .header("content-length", "5")
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        response(&mut resp);
        let h = resp.headers();
        for gone in [
            "connection",
            "x-second-hop",
            "transfer-encoding",
            "content-length",
        ] {
            assert!(h.get(gone).is_none(), "{gone} should be removed");
        }
        assert_eq!(h["content-type"], "application/json");
        // Without Transfer-Encoding a length is the framing, and stays.
        let mut resp = Response::builder()
            .header("content-length", "5")
            .body(())
            .unwrap();
        response(&mut resp);
        assert_eq!(resp.headers()["content-length"], "5");
    }

    #[test]
    fn appends_to_an_existing_forwarded_for() {
        let o = Origin::parse("http://h:1").unwrap();
        let mut req = Request::builder()
            .uri("/")
            .header("x-forwarded-for", "1.1.1.1")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(ClientAddr::new("[::1]:5".parse().unwrap()));
        request(&mut req, &o);
        assert_eq!(req.headers()["x-forwarded-for"], "1.1.1.1, ::1");
    }

    #[test]
    fn an_upstream_key_replaces_the_clients() {
        let origin = Origin::parse("http://127.0.0.1:1")
            .unwrap()
            .with_api_key("sk-backend")
            .unwrap();
        let mut req = Request::builder()
            .uri("/v1/models")
            .header("authorization", "Bearer sk-client")
            .body(())
            .unwrap();
        request(&mut req, &origin);
        assert_eq!(req.headers()["authorization"], "Bearer sk-backend");
        assert_eq!(req.headers().get_all("authorization").iter().count(), 1);
        assert!(!format!("{origin:?}").contains("sk-backend"));
        assert!(Origin::parse("http://h")
            .unwrap()
            .with_api_key("a b")
            .is_ok());
        assert!(Origin::parse("http://h")
            .unwrap()
            .with_api_key("a\nb")
            .is_err());
    }

    #[test]
    fn refuses_bad_origins() {
        assert!(Origin::parse("127.0.0.1:1234").is_err());
        assert!(Origin::parse("ftp://h").is_err());
        assert!(Origin::parse("http://h:1/?a=b").is_err());
        assert!(Origin::parse("not a url").is_err());
    }
}
