//! Where an upstream is: its scheme, authority and path prefix, the key
//! anteroom sends it, and (for `https://`) its TLS settings once attached.

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri};

/// Where requests go: an http:// authority and an optional path prefix.
#[derive(Clone, Debug)]
pub struct Origin {
    authority: Authority,
    /// The Host header the upstream gets, made once.
    host: HeaderValue,
    /// Path prefix without a trailing slash ("" for none).
    prefix: String,
    /// `Bearer <the upstream's key>`, replacing the client's, if configured.
    /// Marked sensitive, so it prints as `Sensitive`.
    authorization: Option<HeaderValue>,
    /// `https://`: the TLS settings, once attached ([`Origin::with_tls`]).
    https: bool,
    tls: Option<crate::tls::UpstreamTls>,
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
        let https = if scheme == Scheme::HTTP {
            false
        } else if scheme == Scheme::HTTPS {
            true
        } else {
            return Err(format!("`{url}`: the scheme must be http:// or https://"));
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{url}` has no host"))?;
        if uri.query().is_some() {
            return Err(format!("`{url}`: an upstream URL cannot have a query"));
        }
        let prefix = uri.path().trim_end_matches('/').to_string();
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("`{url}`: the host is not a valid header value ({e})"))?;
        Ok(Self {
            authority,
            host,
            prefix,
            authorization: None,
            https,
            tls: None,
        })
    }

    /// The Host header it is sent.
    pub(crate) fn host_header(&self) -> &HeaderValue {
        &self.host
    }

    /// Is it `https://`?
    pub(crate) fn is_https(&self) -> bool {
        self.https
    }

    /// Reach an `https://` origin with these TLS settings (no effect on an
    /// `http://` one).
    pub fn with_tls(
        mut self,
        config: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<Self, String> {
        if self.https {
            self.tls = Some(crate::tls::UpstreamTls::new(config, self.authority.host())?);
        }
        Ok(self)
    }

    /// Its TLS settings, for an `https://` origin.
    pub(crate) fn tls(&self) -> Option<&crate::tls::UpstreamTls> {
        self.tls.as_ref()
    }

    /// The port to connect to (the scheme's default if none is given).
    pub(crate) fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.https { 443 } else { 80 })
    }

    /// Send `key` to this upstream as `Authorization: Bearer …` in place of
    /// whatever the client sent. Refused when it cannot be a header value
    /// (the message does not repeat the key).
    pub(crate) fn with_api_key(mut self, key: &str) -> Result<Self, String> {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", key.trim()))
            .map_err(|_| "the API key has characters a header cannot carry".to_string())?;
        v.set_sensitive(true);
        self.authorization = Some(v);
        Ok(self)
    }

    /// Whether `other` reaches the same place the same way: scheme,
    /// authority, path prefix and upstream key (a pool of connections to
    /// one serves the other).
    pub(crate) fn same_address(&self, other: &Origin) -> bool {
        self.https == other.https
            && self.authority == other.authority
            && self.prefix == other.prefix
            && self.authorization == other.authorization
    }

    /// The `Authorization` this upstream is sent, if anteroom holds its key.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
    }

    /// The authority (host:port).
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The origin-form URI of `path` (behind the prefix).
    pub(crate) fn path_for(&self, path: &str) -> Uri {
        self.uri_for(path.parse::<PathAndQuery>().ok().as_ref())
    }

    /// The origin-form URI (`/path?query`, behind the prefix) an HTTP/1.1
    /// request to the upstream carries.
    pub(crate) fn uri_for(&self, pq: Option<&PathAndQuery>) -> Uri {
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
}
