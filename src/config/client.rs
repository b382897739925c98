//! The upstream client's settings: time-outs, the pool, what it may ask a
//! backend for, and how refused requests are retried.

use std::time::Duration;

/// Connection settings of the upstream client.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Most time to open a TCP connection.
    pub connect_timeout: Duration,
    /// Most time from sending the request to the response headers.
    pub response_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Time-outs of a streamed (SSE) answer after its headers.
    pub stream: StreamTimeouts,
    /// Ask a vLLM upstream for the usage of streams that did not ask for
    /// it, and take that event out of the answer (see [`usage`](crate::upstream::usage)).
    pub stream_usage: bool,
    /// Send a llama.cpp upstream non-streamed requests as streams, for
    /// their true time to first token (see [`upgrade`](crate::upstream::upgrade)); a request's
    /// header may say otherwise.
    pub stream_upgrade: bool,
}

/// The stream timeouts.
#[derive(Clone, Copy, Debug)]
pub struct StreamTimeouts {
    /// Most time from the response headers to the first data.
    pub first_token: Duration,
    /// Most time between two pieces of data.
    pub idle: Duration,
}

/// The retry settings: the slice of the config this step needs.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Most retries of one request.
    pub max_retries: u32,
    /// First back-off delay (doubled per retry) when the upstream advises
    /// none.
    pub base_delay: Duration,
    /// Longest wait for one retry: an upstream that advises longer is not
    /// waited for (its answer goes to the client).
    pub max_delay: Duration,
    /// Retries as a share of recent requests.
    pub budget: f64,
}
