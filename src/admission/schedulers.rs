//! Where admission takes its slots: the scheduler of the upstream each
//! request is routed to.
//!
//! Admission owns this trait and the router implements it (see
//! [`route`](crate::route)), so admission depends on no routing code; one
//! upstream is a table of one row.

use std::fmt;

use super::scheduler::{Acquire, Replayable};
use crate::types::{Admit, Allowance, Priority};
use crate::BoxError;

/// The upstreams' schedulers, by route (an index into the upstream table).
pub trait Schedulers: fmt::Debug + Send + Sync + 'static {
    /// Ask upstream `route`'s scheduler for a slot for `admit` (its
    /// priority, share and deadline). `replay` is called only when
    /// preemption is on (see [`Scheduler::acquire_within`](super::Scheduler::acquire_within)).
    fn acquire(
        &self,
        route: usize,
        admit: &Admit,
        replay: &dyn Fn() -> Option<Replayable>,
    ) -> Acquire;

    /// The room upstream `route`'s queue has for requests at `priority`
    /// (see [`Scheduler::room`](super::Scheduler::room)); None: not known.
    fn room(&self, _route: usize, _priority: Priority) -> Option<Allowance> {
        None
    }

    /// Where waiting requests are listed for `GET /status/requests/{id}`;
    /// None: they are not.
    fn waiting(&self) -> Option<&std::sync::Arc<super::listed::Waiting>> {
        None
    }

    /// Another upstream in service that serves `model`, for a request
    /// whose upstream `from` was taken out of service while it waited.
    /// None: the refusal to answer with.
    fn reroute(&self, model: Option<&str>, from: usize) -> Result<usize, BoxError>;
}
