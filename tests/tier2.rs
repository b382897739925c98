//! Tier 2: tests that need tools beyond the Rust toolchain and Python 3.
//! `.ci/run` installs them and runs `cargo test --test tier2`; a plain
//! `cargo test` leaves this binary out (`test = false` in Cargo.toml).

#[path = "support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "dashboard.rs"]
mod dashboard;

#[path = "tier2/promtool.rs"]
mod promtool;

#[path = "tier2/llama_server.rs"]
mod llama_server;

#[path = "tier2/cluster.rs"]
mod cluster;
