//! anteroom: `async fn(Request) -> Result<Response, Error>` in front of an
//! OpenAI-compatible model server, deciding who goes in and when.
//!
//! At most `max_concurrency` generation requests are in flight at the
//! upstream (a streamed generation counts until its last byte); the rest wait
//! in a bounded priority queue; when it cannot take more, the client gets an
//! honest 429 with a `Retry-After` computed from the measured drain rate.
//! Everything else passes through byte for byte.
//!
//! # The request path
//!
//! ```text
//! client ─▶ server ─▶ Edge ─▶ Telemetry ─▶ Auth ─▶ Classify ─▶ Route ─▶ Admission ─▶ Backoff ─▶ Upstream ─▶ model server(s)
//!           (accept)  (id,     (Tap: the     (API    (priority,   (which    (queue,       (429/503:   (pooled client;
//!                     rescue)  request's     key →   buffer body) upstream, permit, per   wait, retry, stamps dispatch
//!                              record)       tenant)              by model) upstream)     pause all)  and headers)
//! client ◀── TimedBody (first token, token events, usage, last byte → one Record)
//!                 ◀── PermitBody (slot released at end of body or drop) ◀── upstream body
//! ```
//!
//! With `queue_keepalive` set, [`keepalive`] sits between Edge and
//! Telemetry: a queued stream that asked is answered early and kept alive
//! with SSE comments, while telemetry records the answer underneath.
//!
//! With `[cluster]`, [`cluster`]'s layer sits between Admission and Backoff:
//! a request with its replica's slot also waits for the cluster's lease.
//!
//! [`app::build_stack`] is the one place that orders these layers.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod admin;
pub mod admission;
pub mod app;
pub mod auth;
pub mod backend;
pub mod backoff;
pub mod classify;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod deadline;
pub mod drain;
pub mod edge;
pub mod error;
pub(crate) mod h2;
pub mod json_scan;
pub mod keepalive;
pub mod memory;
pub mod origin;
pub mod path;
pub(crate) mod random;
pub mod reload;
pub mod report;
pub mod route;
pub mod server;
pub mod sim;
pub mod telemetry;
pub mod tls;
pub mod types;
pub mod upstream;

/// The error type inside the stack.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body every listener serves.
pub type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;
