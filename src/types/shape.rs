//! The kind of answer a non-streamed request is upgraded into.

/// What kind of answer is being put back together from a stream (see
/// [`upgrade`](crate::upstream::upgrade)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `/chat/completions`: `message`s from `delta`s.
    Chat,
    /// `/completions`: `text`s.
    Text,
}
