//! Why back-off sent a request again.

/// Why a request was retried; the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// The upstream answered 429.
    TooManyRequests,
    /// The upstream answered 503.
    Unavailable,
    /// The connection was refused or reset before any response.
    Connection,
    /// Another status the upstream marked `x-should-retry: true`.
    Advised,
}

impl RetryReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::TooManyRequests => "status_429",
            RetryReason::Unavailable => "status_503",
            RetryReason::Connection => "connection",
            RetryReason::Advised => "advised",
        }
    }
}
