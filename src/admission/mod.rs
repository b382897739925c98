//! Layer 6 of 8 (after route, before back-off): admit, queue by priority,
//! or shed.
//!
//! At most `max_concurrency` admitted requests are in flight at the upstream.
//! A request that finds every slot taken (or others already waiting) joins a
//! bounded [`PriorityQueue`] ordered by `(priority, arrival)`. It leaves the
//! queue when a slot is handed to it, when it has waited `queue_timeout`
//! (429 `queue_timeout`), when a more urgent request evicts it from a full
//! queue (429 `queue_full`), or when its client goes away (dropping the future
//! drops the [`Ticket`], which removes it at once).
//!
//! The slot is a [`Permit`]: it travels inside the response body
//! ([`PermitBody`]) and is released when the last byte was taken, the body
//! failed, or the client disconnected. Release hands the slot straight to the
//! most urgent waiter, so a freed slot is never up for grabs by a newcomer.
//!
//! Only requests that [`classify`](crate::classify) marked with an
//! [`Admit`](crate::types::Admit) extension go through the queue; anything
//! else (GET /v1/models, …) passes straight through.
//!
//! # Differences from `tower::limit::ConcurrencyLimit`
//! tower's limit waits in `poll_ready`, which cannot see the request, so it
//! cannot order by priority, and it releases its permit when the headers
//! arrive, which ignores a streamed body. Here `poll_ready` is always ready,
//! the waiting happens in the [`ResponseFuture`](future::ResponseFuture), and
//! the permit lives until the body ends.
//!
//! # Example
//! In anteroom the [`Router`](crate::route::Router) supplies the
//! schedulers; anything that implements [`Schedulers`] can.
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use anteroom::admission::{Acquire, AdmissionLayer, Replayable, Scheduler, Schedulers};
//! use anteroom::config::Limits;
//! use anteroom::types::{Admit, Overloaded, Priority, Reason, Share};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! /// One scheduler for every request.
//! #[derive(Debug)]
//! struct One(Arc<Scheduler>);
//!
//! impl Schedulers for One {
//!     fn acquire(&self, _route: usize, admit: &Admit,
//!                replay: &dyn Fn() -> Option<Replayable>) -> Acquire {
//!         self.0.acquire_within(admit.priority, &admit.share, admit.deadline, replay)
//!     }
//!     fn reroute(&self, _model: Option<&str>, _from: usize) -> Result<usize, anteroom::BoxError> {
//!         Err(Overloaded::new(Reason::Rerouted, Duration::from_secs(1)).into())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let scheduler = Scheduler::new(Limits {
//!     max_concurrency: 1,
//!     max_queue: 100,
//!     queue_timeout: Duration::from_secs(30),
//!     retry_after_cap: Duration::from_secs(60),
//!     reserved: vec![],
//!     promote_after: None,
//!     preempt: None,
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(AdmissionLayer::new(Arc::new(One(scheduler.clone()))))
//!     .service(service_fn(|_req: http::Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
//!     }));
//! let mut req = http::Request::new(());
//! req.extensions_mut().insert(Admit::new(0));
//! let resp = svc.oneshot(req).await.unwrap();
//! assert_eq!(scheduler.snapshot().running, 1); // the body still holds the slot
//! drop(resp);
//! assert_eq!(scheduler.snapshot().running, 0);
//! # }
//! ```

pub mod adaptive;
mod advice;
pub mod future;
mod layer;
pub mod listed;
pub mod passing;
mod permit;
pub mod preempt;
pub mod queue;
mod scheduler;
mod schedulers;
mod service;
mod state;
mod ticket;

pub use layer::AdmissionLayer;
pub use permit::{Permit, PermitBody};
pub use queue::PriorityQueue;
pub use scheduler::{Acquire, Grant, Replayable, Scheduler, Ticket};
pub use schedulers::Schedulers;
pub use service::{Admission, Detach};

#[cfg(test)]
mod preempt_tests;
#[cfg(test)]
mod tests;
