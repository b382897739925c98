//! The client connection a request came on.

use std::net::SocketAddr;

use http::HeaderValue;

/// The peer address of the client connection, set by the server on every
/// request it reads. The IP is formatted once per connection, not per request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientAddr {
    addr: SocketAddr,
    ip: HeaderValue,
    /// `https` when the client came over TLS, else `http`.
    proto: HeaderValue,
    /// The address as a fair-queuing tenant id, hashed once per connection.
    tenant: u64,
}

impl ClientAddr {
    /// The connection's peer.
    pub fn new(addr: SocketAddr) -> Self {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .expect("an IP address is a valid header value");
        let tenant = super::hashed_tenant(ip.as_bytes());
        Self {
            addr,
            ip,
            proto: HeaderValue::from_static("http"),
            tenant,
        }
    }

    /// The address as a tenant id.
    pub fn tenant(&self) -> u64 {
        self.tenant
    }

    /// The client came over TLS.
    pub(crate) fn over_tls(mut self) -> Self {
        self.proto = HeaderValue::from_static("https");
        self
    }

    /// The peer's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https` when the client came over TLS, else `http`.
    pub(crate) fn proto(&self) -> &HeaderValue {
        &self.proto
    }

    /// The peer's IP, formatted.
    pub fn ip(&self) -> &HeaderValue {
        &self.ip
    }
}
