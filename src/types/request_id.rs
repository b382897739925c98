//! The id every request carries.

use http::header::{HeaderName, HeaderValue};

/// The request id header, kept when the client sends a usable one and
/// generated otherwise; the upstream and the response carry it.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, in its extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(pub HeaderValue);
