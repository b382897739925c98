//! The headers telemetry adds to admitted responses.

use http::header::HeaderName;

/// The W3C Server-Timing header.
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
/// On an admitted response whose priority the key's `max_priority` clamped:
/// the priority it ran at.
pub const CLAMPED_HEADER: HeaderName = HeaderName::from_static("x-anteroom-priority-clamped");
/// The OpenAI SDKs' retry counter: above 0 on a client's own retry.
pub(super) const CLIENT_RETRY: HeaderName = HeaderName::from_static("x-stainless-retry-count");
/// Milliseconds the request spent queued (arrival → dispatch), on admitted
/// responses.
pub const QUEUE_MS_HEADER: HeaderName = HeaderName::from_static("x-anteroom-queue-ms");
