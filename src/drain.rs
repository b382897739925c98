//! Graceful shutdown: stop taking work, finish what runs, lose nothing.
//!
//! On SIGTERM/SIGINT, [`Running::drain`](crate::cli::serve::Running::drain)
//! sets a deadline (`drain_timeout` from now) and:
//! - the listeners stop accepting; every open connection is told to close
//!   once its in-flight request is answered (idle keep-alive connections
//!   close at once, HTTP/2 clients get GOAWAY);
//! - each scheduler keeps starting queued requests only while one can still
//!   be expected to finish before the deadline (the measured service time);
//!   the rest, and any request that arrives anyway, get 503
//!   `shutting_down` with a `Retry-After` of the time left;
//! - running requests go on; a stream still running at the deadline ends
//!   with a final `data: {"error":{… "code":"shutting_down"}}` event (the
//!   [`StreamGuard`](crate::upstream::guard::StreamGuard) watches this
//!   [`Drain`]), so its client sees a clear error, not a cut connection;
//!   a request still waiting for its answer's headers then (a non-streamed
//!   generation) is answered 503 `shutting_down` by the upstream client;
//! - a moment after the deadline whatever is left is dropped (its record
//!   says `cancelled`), the request log is flushed, and the process exits 0.
//!
//! The state is one `OnceLock` read per stream frame, or per second of a
//! wait: no lock, no registration per request.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

/// How long after the deadline connections still open are dropped: time for
/// the streams' final error events to be written.
pub const GRACE: Duration = Duration::from_millis(500);

/// Whether the server is draining, and until when. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct Drain(Arc<OnceLock<Instant>>);

impl Drain {
    /// A server that is not draining (yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// Start draining, to end at `deadline`. Later calls change nothing.
    pub(crate) fn begin(&self, deadline: Instant) {
        let _ = self.0.set(deadline);
    }

    /// The deadline, once draining.
    pub fn deadline(&self) -> Option<Instant> {
        self.0.get().copied()
    }
}
