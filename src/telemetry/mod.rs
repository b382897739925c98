//! Layer 2 of 8 (after the edge, before auth): where every request's time
//! goes, kept as one [`Record`] per request.
//!
//! The [`Telemetry`] layer sits just inside the edge's rescue, so it sees
//! every request: admitted, passed through, rejected or failed. It puts a
//! [`Tap`] in the request's extensions, which the steps below fill in as the
//! request passes them ([`classify`](crate::classify) notes the model,
//! priority and `stream`; the [`upstream`](crate::upstream) notes when the
//! request was dispatched and when the response headers came back), and it
//! wraps the response body in a [`TimedBody`] that watches the bytes go out:
//! the first token, each token event, the `usage` numbers, the last byte.
//! The body is observed, never changed (see [`observe`]).
//!
//! When the body ends, fails, or is dropped because the client left, or when
//! the request fails before it has a response, the record is finished once:
//! counted in the [`Metrics`] and handed to the [`RequestLog`] if there is
//! one. A request whose client leaves while it is queued is recorded too
//! (status 499, outcome `cancelled`).
//!
//! ```text
//! arrival ── queue_ms ──▶ dispatch ── upstream_headers_ms ──▶ headers ──▶ first token ──▶ … ──▶ last byte
//!    │                       └──────────── backend_ttft_ms ───────────────────┘                      │
//!    └──────────────────────────────── ttft_ms ──────────────────────────────┘                      │
//!    └──────────────────────────────────────────── e2e_ms ──────────────────────────────────────────┘
//! ```
//!
//! Admitted responses also get `server-timing: queue;dur=…, upstream;dur=…`
//! (W3C Server Timing, milliseconds) and `x-anteroom-queue-ms`, so a client
//! can take the queue out of its own latency figures.
//!
//! One file per job: `layer` (the tower layer and its future), `tap` (the
//! notes the steps fill in), `capture` (the record in the making),
//! `body` (the timed response body), `headers` (what admitted responses
//! get), `recorder` (where records go), `signals` (what the adaptive limit
//! listens to), and below them `observe` (reading
//! events), `record`, `metrics` and `log`.

pub mod log;
pub mod metrics;
pub mod observe;
pub mod record;

mod body;
mod capture;
mod headers;
mod layer;
mod recorder;
mod signals;
mod tap;
pub mod trace;

pub use log::RequestLog;
pub use metrics::Metrics;
pub use observe::{Framing, Observer};
pub use record::{Finished, Outcome, Record, Timings, TokenSource};

pub use body::TimedBody;
pub use headers::{CLAMPED_HEADER, QUEUE_MS_HEADER, SERVER_TIMING};
pub use layer::{ResponseFuture, Telemetry, TelemetryLayer};
pub use recorder::Recorder;
pub(crate) use signals::micros;
pub use signals::{Signals, Taken};
pub use tap::{Classified, Tap};
pub use trace::Tracer;
