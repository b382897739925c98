//! Layer 5 of 8 (after [`classify`](crate::classify), before
//! [`admission`](crate::admission)): which upstream a request goes to.
//!
//! An admitted request goes to an upstream that serves the body's `model`:
//! one whose `models` list names it, else one whose `models` is `"*"`.
//! Among those replicas it goes
//! to the one with the least outstanding work for its weight: (waiting +
//! running) / weight, ties broken round-robin. The choice is a [`Route`](crate::types::Route) in
//! the request's extensions; admission queues the request on that
//! upstream's own scheduler (its own `max_concurrency`), and the upstream
//! client sends it there. A model nobody serves is a 404 (`model_not_found`)
//! that lists what is served.
//!
//! `GET /v1/models` is answered with the union of every upstream's list
//! (each asked in turn; a list in the config filters what that upstream
//! reports; duplicates are dropped). Other requests that bypass admission
//! go to the first upstream in service.
//!
//! With a single upstream the layer passes everything straight through.
//! The upstreams live in a [`Table`] that a reload replaces
//! ([`Router::reconfigure`]); a request reads it once per step, lock-free.
//!
//! One file per job: `table` (the upstreams, reloads, picking), `layer`
//! (the tower layer), `models` (the `/v1/models` union), `health` (probes)
//! and `adaptive` (the adaptive limit's loop on the first upstream).

mod adaptive;
mod clients;
mod health;
mod layer;
mod models;
mod table;

pub use adaptive::run_adaptive;
pub use clients::Clients;
pub use layer::{ResponseFuture, RouteLayer, RouteService};
#[cfg(test)]
pub(crate) use table::one_row;
pub use table::{Router, Row, SetChange, Table};
