//! Configuration as plain settings: the file's schema ([`FileConfig`]),
//! its validation into the [`Config`] the layers take their slices from,
//! and those slices, one file per concern. Nothing here reads a file or
//! builds runtime state: [`app::build`](crate::app::build) reads the TLS
//! files and creates the limiters, schedulers and the upstream table from a
//! `Config`.
//!
//! Every key can also be given as a command-line flag of `anteroom serve`
//! (`max_queue` is `--max-queue`); a flag overrides the file. Unknown keys and
//! bad values are refused at start with a message that names the key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::origin::Origin;

mod admission;
mod admit_rules;
pub mod backend;
mod client;
mod file;
mod keys;
mod server;
mod validate;

pub use admission::{Adaptive, AdaptiveBounds, Limits, Preemption, Reservation};
pub use admit_rules::AdmitRules;
pub use client::{ClientSettings, RetryPolicy, StreamTimeouts};
pub use file::{
    Concurrency, FileConfig, KeyEntry, ModelName, Models, Secret, TracesEntry, UpstreamEntry,
    Upstreams,
};
pub use keys::KeySetting;
pub use server::ServerLimits;
pub use validate::{parse_duration, Env};

/// A config that failed to load or validate. The message names the key.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The validated runtime config.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file (with flags applied) this was validated from, for reloads
    /// to compare against.
    pub file: FileConfig,
    /// Proxy listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// SHA-256 of the admin key, if the admin endpoints need one.
    pub admin_key: Option<[u8; 32]>,
    /// Every upstream, with what it serves (one for a plain `upstream = URL`).
    pub replicas: Vec<ReplicaConfig>,
    /// Admission limits.
    pub limits: Limits,
    /// Which requests are admitted.
    pub rules: AdmitRules,
    /// Upstream client settings.
    pub client: ClientSettings,
    /// Where the request log goes, if anywhere.
    pub request_log: Option<PathBuf>,
    /// Retrying refused requests.
    pub retry: RetryPolicy,
    /// The adaptive limit, when `max_concurrency` is `"auto"` or `"backend"`.
    pub adaptive: Option<Adaptive>,
    /// Health checks of several upstreams.
    pub health: HealthConfig,
    /// Threads serving the proxy port (resolved: at least 1).
    pub workers: usize,
    /// The listener's certificate and key, when it serves HTTPS.
    pub tls: Option<TlsFiles>,
    /// Extra CA certificates `https://` upstreams are checked against.
    pub upstream_ca_file: Option<PathBuf>,
    /// Most time to drain on SIGTERM/SIGINT.
    pub drain_timeout: Duration,
    /// API keys, resolved to digests.
    pub keys: Vec<KeySetting>,
    /// Limits on each client connection.
    pub server: ServerLimits,
    /// Answer with OpenAI's `x-ratelimit-*` headers.
    pub rate_limit_headers: bool,
    /// Keep-alive comments for queued streams that ask, this often.
    pub queue_keepalive: Option<Duration>,
    /// Shared limits through Redis, when `[cluster]` is set.
    pub cluster: Option<ClusterConfig>,
    /// OpenTelemetry traces, when `[traces]` is set.
    pub traces: Option<TracesConfig>,
}

/// `[traces]`, validated.
#[derive(Clone)]
pub struct TracesConfig {
    /// The collector (`/v1/traces` is its path).
    pub collector: crate::origin::Origin,
    /// Headers sent with every export.
    pub headers: http::HeaderMap,
    /// The share of new traces kept.
    pub sampling_ratio: f64,
    /// `service.name` and the other resource attributes.
    pub service_name: String,
    /// More resource attributes.
    pub resource: Vec<(String, String)>,
    /// Longest a finished span waits to be sent.
    pub batch_delay: Duration,
    /// Most finished requests whose spans wait to be sent.
    pub max_queued_traces: usize,
    /// Most time one export may take.
    pub export_timeout: Duration,
}

impl std::fmt::Debug for TracesConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TracesConfig")
            .field("collector", self.collector.authority())
            .field("sampling_ratio", &self.sampling_ratio)
            .field("service_name", &self.service_name)
            .field("batch_delay", &self.batch_delay)
            .field("max_queued_traces", &self.max_queued_traces)
            .finish_non_exhaustive()
    }
}

/// `[cluster]`, validated.
#[derive(Clone)]
pub struct ClusterConfig {
    /// Where Redis is (with its password, if any: never printed).
    pub redis_url: String,
    /// The key prefix.
    pub name: String,
    /// How long a lease lives without a heartbeat.
    pub lease_time: Duration,
    /// Most time one call to Redis may take.
    pub timeout: Duration,
    /// What to do while Redis cannot be reached.
    pub on_unavailable: OnUnavailable,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("name", &self.name)
            .field("lease_time", &self.lease_time)
            .field("timeout", &self.timeout)
            .field("on_unavailable", &self.on_unavailable)
            .finish_non_exhaustive()
    }
}

/// What a replica does while Redis cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnUnavailable {
    /// Admit its share of each limit alone (the limit divided by the
    /// replicas seen alive last).
    Local,
    /// Refuse admitted requests with 503 `cluster_unavailable`.
    Closed,
}

/// The PEM files of the listener's certificate chain and private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// `tls_cert`.
    pub cert: PathBuf,
    /// `tls_key`.
    pub key: PathBuf,
}

/// Health checks (several upstreams only).
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// Probed path.
    pub path: String,
    /// Probe interval.
    pub interval: Duration,
    /// Consecutive failures that eject an upstream.
    pub eject_after: u32,
}

/// One validated upstream.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// Its name.
    pub name: String,
    /// Where it is.
    pub origin: Origin,
    /// What it serves.
    pub models: Models,
    /// Its limit (the start of `"auto"`'s range with one upstream).
    pub max_concurrency: usize,
    /// Its share among replicas of the same model.
    pub weight: u32,
    /// What it is, as configured.
    pub backend: backend::Setting,
    /// Its own `stream_upgrade`, if its table sets one.
    pub stream_upgrade: Option<bool>,
    /// What its generations may ask for.
    pub max_tokens: crate::types::TokenBounds,
}
