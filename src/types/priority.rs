//! How urgent a request is.

/// A request's priority: lower is served sooner.
pub type Priority = i32;

/// The header that sets a request's priority.
pub const PRIORITY_HEADER: &str = "x-priority";
