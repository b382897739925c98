//! How urgent a request is.

/// A request's priority: lower is served sooner.
pub type Priority = i32;

/// The header that sets a request's priority.
/// A `HeaderName`, not a `&str`: a lookup by name then skips parsing it.
pub const PRIORITY_HEADER: http::header::HeaderName =
    http::header::HeaderName::from_static("x-priority");
