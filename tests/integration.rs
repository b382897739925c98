//! The integration tests, in one binary: one link instead of twenty, and a
//! fraction of the disk (each test binary carries the whole crate).
//! Each module is one area, run on real sockets against the simulator.

mod support;

mod abuse;
mod adaptive;
mod admission;
mod auth;
mod backend;
mod backoff;
mod config;
mod container;
mod dashboard;
mod deadline;
mod demo;
mod drain;
mod hostile;
mod keepalive;
mod openai_sdk;
mod panics;
mod passthrough;
mod preemption;
mod ratelimit;
mod reload;
mod routing;
mod stack;
mod standing;
mod streams;
mod telemetry;
mod tenants;
mod tls;
mod traces;
