//! The words every step of the request path shares, as leaf modules that
//! import nothing else of the crate: a request's [`Priority`], its
//! [`Admit`] mark and [`Share`] of the slots, its [`Tenant`], the [`Model`]
//! it names, the [`Route`] it was given, the [`ClientAddr`] it came from,
//! its [`RequestId`], its [`TokenCharge`], and [`Overloaded`], the refusal
//! any step may answer with.
//!
//! Steps put these in a request's extensions and read them there; keeping
//! them here lets each step depend on the vocabulary instead of on the step
//! that first needed the word.

mod admit;
mod backend_load;
mod backend_status;
mod client;
mod digest;
mod header_buf;
mod max_tokens;
mod model;
mod overloaded;
mod priority;
mod queue_status;
pub mod ratelimit;
mod request_id;
mod retry_reason;
mod route;
mod shape;
mod tenant;
pub mod tokens;

pub use admit::Admit;
pub use backend_load::BackendLoad;
pub use backend_status::BackendStatus;
pub use client::ClientAddr;
pub use digest::{digest, parse_hex_digest};
pub use header_buf::HeaderBuf;
pub use max_tokens::TokenBounds;
pub use model::Model;
pub use overloaded::{Overloaded, Reason};
pub use priority::{Priority, PRIORITY_HEADER};
pub use queue_status::{PreemptedCounts, QueueStatus, ReservationStatus, TenantStatus};
pub use ratelimit::Allowance;
pub use request_id::{RequestId, REQUEST_ID};
pub use retry_reason::RetryReason;
pub use route::{route_of, Route};
pub use shape::Shape;
pub(crate) use tenant::hashed_tenant;
pub use tenant::{key_tenant, Share, Tenant, TenantId, TENANT_HEADER};
pub use tokens::{prompt_estimate, TokenBudget, TokenCharge, DEFAULT_COMPLETION_ESTIMATE};
