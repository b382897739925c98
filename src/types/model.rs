//! The model a request names.

use bytes::Bytes;

/// The body's `model`, kept (as a slice of the buffered body, no copy) when
/// requests are routed among several upstreams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model(pub Bytes);

impl Model {
    /// The name ("" if it is not UTF-8).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}
