//! Preemption: an urgent request never waits behind work nobody has seen
//! an answer of yet.
//!
//! With `preempt` on, a running admitted request whose body is held whole
//! is a *candidate* from its dispatch until its response head comes back
//! from below (the moment it would start to reach its client). A
//! non-streamed answer's head comes with the whole generation, so such a
//! request is a candidate for nearly all its run; a stream's head comes
//! with its first token (llama.cpp) or at once (vLLM); an upgraded request
//! (`stream_upgrade`) answers once its stream was put back together.
//!
//! An arrival at `preempt_max_priority` or more urgent that finds no slot
//! it may use, with nobody at least as urgent waiting, takes the slot of
//! the least urgent candidate of a strictly less urgent priority (of those,
//! the one that started last: the least work lost). Under the scheduler's
//! lock the victim's slot changes hands and the victim is put back in the
//! queue at its own priority, ahead of everything of that priority that
//! arrived after it; its new place is sent to it, and it drops its
//! upstream call (the backend sees the connection close and stops
//! generating), then waits again with the queue time it had left. Its
//! client sees nothing of it: the dropped attempt's bytes never went past
//! admission. The same body goes again; back-off starts afresh inside the
//! new slot.
//!
//! A request is preempted at most `max_preemptions` times; after that it
//! runs to its end, so a steady flood of urgent work cannot livelock it.
//!
//! # Reserved slots, lent
//! With preemption on, a candidate whose client did not ask for a stream
//! (it stays a candidate until its answer is complete) may run in the idle
//! slots of reservations whose every priority may preempt
//! (`max_priority <= preempt_max_priority`): an urgent arrival takes the
//! slot back at once. Without preemption reservations are never lent.

use bytes::Bytes;
use http_body_util::{Either, Empty, Full};

/// A request body that can be sent again: one held whole in memory.
pub trait Replay: Sized {
    /// Whether [`replay`](Self::replay) would give a copy.
    fn can_replay(&self) -> bool;

    /// A copy to send, if the body is held whole.
    fn replay(&self) -> Option<Self>;
}

/// Classify's bodies: buffered (left) or streamed (right).
impl<B> Replay for Either<Full<Bytes>, B> {
    fn can_replay(&self) -> bool {
        matches!(self, Either::Left(_))
    }

    fn replay(&self) -> Option<Self> {
        match self {
            Either::Left(full) => Some(Either::Left(full.clone())),
            Either::Right(_) => None,
        }
    }
}

/// Bodies that are values (tests, examples).
macro_rules! replay_by_clone {
    ($($body:ty),*) => {
        $(impl Replay for $body {
            fn can_replay(&self) -> bool {
                true
            }

            fn replay(&self) -> Option<Self> {
                Some(self.clone())
            }
        })*
    };
}
replay_by_clone!((), String, Empty<Bytes>, Full<Bytes>);

/// A copy of `req` to send again (its body held whole), or `None`.
pub(crate) fn copy<B: Replay>(req: &http::Request<B>) -> Option<http::Request<B>> {
    let mut copy = http::Request::new(req.body().replay()?);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    Some(copy)
}
