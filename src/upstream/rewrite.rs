//! Header and URI rewriting between client and upstream.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};

/// The peer address of the client connection, set by the server on every
/// request it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Where requests go: an http:// authority and an optional path prefix.
#[derive(Clone, Debug)]
pub struct Origin {
    authority: Authority,
    /// Path prefix without a trailing slash ("" for none).
    prefix: String,
}

impl Origin {
    /// Parse an origin URL such as `http://127.0.0.1:1234` or
    /// `http://gpu-box:8000/vllm`. The query, if any, is refused.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("`{url}` has no scheme (write http://{url})"))?;
        if scheme != Scheme::HTTP {
            return Err(format!(
                "`{url}`: only http:// upstreams are supported so far"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{url}` has no host"))?;
        if uri.query().is_some() {
            return Err(format!("`{url}`: an upstream URL cannot have a query"));
        }
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(Self { authority, prefix })
    }

    /// The authority (host:port).
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The origin-form URI (`/path?query`, behind the prefix) an HTTP/1.1
    /// request to the upstream carries.
    fn uri_for(&self, pq: Option<&PathAndQuery>) -> Uri {
        let pq = pq.map(PathAndQuery::as_str).unwrap_or("/");
        if self.prefix.is_empty() {
            match pq.parse() {
                Ok(uri) => return uri,
                Err(_) => unreachable!("a path and query taken from a parsed URI parses"),
            }
        }
        // The prefix was validated at start and `pq` came from a parsed URI,
        // so the two always fit together.
        format!("{}{}", self.prefix, pq)
            .parse()
            .expect("prefix and path are valid")
    }

    /// The Host header value for the upstream.
    fn host(&self) -> HeaderValue {
        HeaderValue::from_str(self.authority.as_str())
            .expect("an authority is a valid header value")
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), plus the non-standard
/// `proxy-connection` and `keep-alive` that clients still send.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Remove hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(conn) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Point the request at the upstream and set the forwarding headers.
pub fn request<B>(req: &mut Request<B>, origin: &Origin) {
    let uri = origin.uri_for(req.uri().path_and_query());
    *req.uri_mut() = uri;
    // The upstream connection is HTTP/1.1 whatever the client spoke.
    *req.version_mut() = Version::HTTP_11;
    let client = req.extensions().get::<ClientAddr>().copied();
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    // The client's Host named us; the upstream gets its own, and the
    // original travels as x-forwarded-host.
    if let Some(host) = headers.insert(header::HOST, origin.host()) {
        headers.insert("x-forwarded-host", host);
    }
    if let Some(ClientAddr(addr)) = client {
        let ip = addr.ip().to_string();
        let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert("x-forwarded-for", v);
        }
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
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
            .insert(ClientAddr("10.1.2.3:5555".parse().unwrap()));
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
    fn appends_to_an_existing_forwarded_for() {
        let o = Origin::parse("http://h:1").unwrap();
        let mut req = Request::builder()
            .uri("/")
            .header("x-forwarded-for", "1.1.1.1")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(ClientAddr("[::1]:5".parse().unwrap()));
        request(&mut req, &o);
        assert_eq!(req.headers()["x-forwarded-for"], "1.1.1.1, ::1");
    }

    #[test]
    fn refuses_bad_origins() {
        assert!(Origin::parse("127.0.0.1:1234").is_err());
        assert!(Origin::parse("ftp://h").is_err());
        assert!(Origin::parse("http://h:1/?a=b").is_err());
        assert!(Origin::parse("not a url").is_err());
    }
}
