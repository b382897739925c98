//! What each client connection may send, and how long it may take.

use std::time::Duration;

/// What one client connection may send before the server gives up on it.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Most time to receive a request's headers (slowloris).
    pub header_read_timeout: Duration,
    /// Most time a write to the client may stay blocked: a client that
    /// stops reading is disconnected, which frees what its response held.
    pub client_write_timeout: Duration,
    /// Most time an HTTP/2 connection may have no request open; then it is
    /// closed (GOAWAY).
    pub client_idle_timeout: Duration,
    /// Largest request head (request line and headers), in bytes; larger:
    /// 431.
    pub max_header_bytes: usize,
    /// Most request headers; more: 431.
    pub max_headers: usize,
    /// Most client connections open at once (0: no limit). Beyond it a new
    /// connection is closed at once.
    pub max_connections: usize,
    /// Most connections open at once from one client address (0: no limit).
    pub max_connections_per_ip: usize,
    /// Most concurrent HTTP/2 streams a client may open on one connection.
    pub http2_max_streams: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            client_write_timeout: Duration::from_secs(60),
            client_idle_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_connections: 0,
            max_connections_per_ip: 0,
            http2_max_streams: 256,
        }
    }
}
