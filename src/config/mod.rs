//! Configuration: the TOML file's types, their defaults, and validation into
//! the typed runtime config the layers take their slices from.
//!
//! Every key can also be given as a command-line flag of `anteroom serve`
//! (`max_queue` is `--max-queue`); a flag overrides the file. Unknown keys and
//! bad values are refused at start with a message that names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::Key;
use crate::types::Priority;
use crate::upstream::Origin;

mod admission;
pub mod backend;
mod client;
mod routes;
mod server;

pub use admission::{Adaptive, AdaptiveBounds, Limits, Preemption, Reservation};
pub use client::{ClientSettings, RetryPolicy, StreamTimeouts};
pub use routes::Routes;
pub use server::ServerLimits;

/// The config file, as written. Every field has a default; `config/default.toml`
/// lists them all.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Address the proxy listens on.
    pub listen: String,
    /// Address of the admin listener (/healthz, /status).
    pub admin_listen: String,
    /// The environment variable holding the admin key: when set, every
    /// admin endpoint but `GET /healthz` needs `Authorization: Bearer <key>`.
    pub admin_key_env: String,
    /// The model server: `http://host:port`, optionally with a path prefix;
    /// or several, as `[[upstream]]` tables.
    pub upstream: Upstreams,
    /// Most requests in flight at the upstream: a number, or `"auto"` to let
    /// anteroom find it between `auto_min_concurrency` and
    /// `auto_max_concurrency`.
    pub max_concurrency: Concurrency,
    /// Lowest limit `"auto"` goes to.
    pub auto_min_concurrency: usize,
    /// Highest limit `"auto"` goes to.
    pub auto_max_concurrency: usize,
    /// What the upstream is: `"auto"` (find out from its endpoints),
    /// `"llama.cpp"`, `"vllm"`, `"ollama"`, `"lmstudio"` or `"openai"`
    /// (read nothing).
    pub backend: backend::Setting,
    /// Most requests waiting for a slot; 0 turns queueing off.
    pub max_queue: usize,
    /// Most time a request may wait for a slot, e.g. "180s".
    pub queue_timeout: String,
    /// Ceiling of the advised `Retry-After`.
    pub retry_after_cap: String,
    /// Largest request body of an admitted request, in bytes.
    pub max_body_bytes: usize,
    /// Most bytes of admitted request bodies held at once, all together
    /// (0: no bound).
    pub max_buffered_bytes: usize,
    /// Most requests passing through without admission at once (0: no
    /// bound).
    pub max_passthrough: usize,
    /// Most time from dispatching a request to the upstream's response headers.
    pub upstream_timeout: String,
    /// Most time to open a connection to the upstream.
    pub connect_timeout: String,
    /// How long an idle upstream connection is kept for reuse.
    pub pool_idle_timeout: String,
    /// Paths whose POST requests go through admission.
    pub admit_paths: Vec<String>,
    /// Priority of a request that names none (lower is sooner).
    pub default_priority: Priority,
    /// File the request log (one JSON line per request) is appended to;
    /// empty: no request log.
    pub request_log: String,
    /// Most times a request the upstream refused (429, 503, connection
    /// refused or reset) is sent again; 0 turns retrying off.
    pub max_retries: u32,
    /// First back-off delay when the upstream advises none (doubled per
    /// retry, fully jittered).
    pub retry_base_delay: String,
    /// Longest wait for one retry; an upstream that advises longer gets its
    /// answer passed to the client.
    pub retry_max_delay: String,
    /// Retries may be at most this share of the requests of the last ten
    /// seconds (plus 10).
    pub retry_budget: f64,
    /// Most time from a streamed answer's headers to its first data.
    pub first_token_timeout: String,
    /// Most time between two pieces of a streamed answer.
    pub stream_idle_timeout: String,
    /// Several upstreams: the path each is probed at (GET, 200 = healthy).
    pub health_path: String,
    /// Several upstreams: how often each is probed.
    pub health_interval: String,
    /// Several upstreams: consecutive failures (requests or probes) that
    /// take one out of service until a probe succeeds.
    pub eject_after: u32,
    /// Threads serving the proxy port; 0 for one per core.
    pub workers: usize,
    /// Slots kept for urgent work: `[[reserve]]` tables of `max_priority`
    /// and `slots`.
    pub reserve: Vec<Reservation>,
    /// An urgent request that finds no slot takes one from a less urgent
    /// request nobody has seen an answer of yet, which waits again and is
    /// sent again; reserved slots are lent out meanwhile.
    pub preempt: bool,
    /// The least urgent priority that may preempt.
    pub preempt_max_priority: Priority,
    /// Most times one request is preempted.
    pub max_preemptions: u32,
    /// API keys: `[[key]]` tables. None: anteroom is open.
    pub key: Vec<KeyEntry>,
    /// Most time a client may take to send a request's headers.
    pub header_read_timeout: String,
    /// Most time a write to a client may stay blocked (a client that stops
    /// reading its response); then the connection is closed.
    pub client_write_timeout: String,
    /// Most time an HTTP/2 client connection may have no request open;
    /// then it is closed.
    pub client_idle_timeout: String,
    /// Most time between two pieces of a request body (a client that
    /// trickles or stops sending it); then 408.
    pub body_read_timeout: String,
    /// Largest request head (request line and headers) in bytes.
    pub max_header_bytes: usize,
    /// Most request headers.
    pub max_headers: usize,
    /// Anti-starvation: a request that has waited this long is served
    /// before any other, whatever its priority. Empty: never.
    pub promote_after: String,
    /// Without keys, take the tenant from the `x-tenant` header (else the
    /// client's address). Only where clients cannot lie about it.
    pub trust_tenant_header: bool,
    /// Ask a vLLM upstream for the usage of streams that did not ask for
    /// it, and take that event out of the answer.
    pub stream_usage: bool,
    /// Send a llama.cpp upstream non-streamed chat and text completions as
    /// streams, for their true time to first token, and answer with the
    /// JSON put back together.
    pub stream_upgrade: bool,
    /// The key sent to the upstream(s) as `Authorization: Bearer …`, in
    /// place of the client's (vLLM's `--api-key`). Prefer `upstream_api_key_env`.
    pub upstream_api_key: Secret,
    /// Or: the environment variable that holds it.
    pub upstream_api_key_env: String,
    /// On SIGTERM/SIGINT, most time to let running requests finish before
    /// the process exits.
    pub drain_timeout: String,
    /// Serve HTTPS with this certificate chain (PEM); with `tls_key`.
    pub tls_cert: String,
    /// The certificate's private key (PEM).
    pub tls_key: String,
    /// Extra CA certificates (PEM) trusted for `https://` upstreams, besides
    /// the webpki roots: a self-signed backend's.
    pub upstream_ca_file: String,
    /// Most client connections open at once (0: no limit).
    pub max_connections: usize,
    /// Most connections open at once from one address (0: no limit).
    pub max_connections_per_ip: usize,
    /// Most concurrent HTTP/2 streams per client connection.
    pub http2_max_streams: u32,
}

/// One `[[key]]` table. The secret is never written here in plain text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// A name: the tenant, in records and metrics.
    pub name: String,
    /// SHA-256 of the key, 64 hex digits (`printf %s "$KEY" | sha256sum`).
    #[serde(default)]
    pub sha256: Option<String>,
    /// Or: the environment variable that holds the key.
    #[serde(default)]
    pub env: Option<String>,
    /// Priority of its requests that name none.
    #[serde(default)]
    pub default_priority: Option<Priority>,
    /// The most urgent priority it may ask for; more urgent is clamped.
    #[serde(default)]
    pub max_priority: Option<Priority>,
    /// Most requests a minute (governor's GCRA: bursts up to this, then
    /// spaced); over it, a 429 saying when to come back.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Most tokens a minute (prompt and answer; estimated on admission from
    /// the body's size and `max_tokens`, corrected from `usage`).
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
    /// Its share of the slots against other keys at the same priority
    /// (default 1; 0 is read as 1).
    #[serde(default)]
    pub weight: u32,
    /// Most of its requests in flight at once; more wait in the queue.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:8081".into(),
            admin_key_env: String::new(),
            upstream: Upstreams::One("http://127.0.0.1:1234".into()),
            max_concurrency: Concurrency::Fixed(4),
            auto_min_concurrency: 1,
            auto_max_concurrency: 64,
            backend: backend::Setting::Auto,
            max_queue: 4096,
            queue_timeout: "180s".into(),
            retry_after_cap: "60s".into(),
            max_body_bytes: 32 * 1024 * 1024,
            max_buffered_bytes: 1024 * 1024 * 1024,
            max_passthrough: 32,
            upstream_timeout: "600s".into(),
            connect_timeout: "5s".into(),
            pool_idle_timeout: "90s".into(),
            admit_paths: vec![
                "/v1/chat/completions".into(),
                "/v1/completions".into(),
                "/v1/embeddings".into(),
                "/v1/responses".into(),
            ],
            default_priority: 0,
            request_log: String::new(),
            max_retries: 5,
            retry_base_delay: "500ms".into(),
            retry_max_delay: "30s".into(),
            retry_budget: 0.5,
            first_token_timeout: "600s".into(),
            stream_idle_timeout: "120s".into(),
            health_path: "/v1/models".into(),
            health_interval: "5s".into(),
            eject_after: 3,
            workers: 0,
            reserve: Vec::new(),
            preempt: false,
            preempt_max_priority: 0,
            max_preemptions: 2,
            key: Vec::new(),
            header_read_timeout: "10s".into(),
            client_write_timeout: "60s".into(),
            client_idle_timeout: "60s".into(),
            body_read_timeout: "60s".into(),
            max_header_bytes: 65536,
            max_headers: 100,
            promote_after: String::new(),
            trust_tenant_header: false,
            stream_usage: true,
            stream_upgrade: false,
            upstream_api_key: Secret::default(),
            upstream_api_key_env: String::new(),
            drain_timeout: "25s".into(),
            tls_cert: String::new(),
            tls_key: String::new(),
            upstream_ca_file: String::new(),
            max_connections: 65_536,
            max_connections_per_ip: 0,
            http2_max_streams: 256,
        }
    }
}

/// `upstream`: one URL, or several `[[upstream]]` tables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Upstreams {
    /// `upstream = "http://127.0.0.1:1234"`.
    One(String),
    /// `[[upstream]]` tables.
    Many(Vec<UpstreamEntry>),
}

impl From<&str> for Upstreams {
    fn from(url: &str) -> Self {
        Upstreams::One(url.to_owned())
    }
}

impl From<String> for Upstreams {
    fn from(url: String) -> Self {
        Upstreams::One(url)
    }
}

/// One `[[upstream]]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamEntry {
    /// A name for logs, metrics and /status.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// The models it serves: a list, or `"*"` for any (the default).
    #[serde(default)]
    pub models: Models,
    /// Its own limit (default: the top-level `max_concurrency`).
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// What it is (default: the top-level `backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<backend::Setting>,
    /// Its share among replicas of the same model (default 1).
    #[serde(default = "one")]
    pub weight: u32,
    /// The key anteroom sends it (in place of the client's `Authorization`);
    /// default: the top-level `upstream_api_key`.
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Or: the environment variable that holds it.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Its own `stream_upgrade` (default: the top-level one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_upgrade: Option<bool>,
}

/// A secret from the config: kept out of `Debug` output.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// The key an upstream is sent: given in the file, or read from `env`.
fn upstream_key(
    at: &str,
    key: Option<&Secret>,
    env: Option<&str>,
) -> Result<Option<String>, ConfigError> {
    match (key, env) {
        (Some(_), Some(_)) => Err(ConfigError(format!(
            "{at}: give api_key or api_key_env, not both"
        ))),
        (Some(k), None) if k.0.trim().is_empty() => {
            Err(ConfigError(format!("{at}: api_key is empty")))
        }
        (Some(k), None) => Ok(Some(k.0.clone())),
        (None, Some(var)) => match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(Some(v)),
            Ok(_) => Err(ConfigError(format!("{at}: {var} is empty"))),
            Err(_) => Err(ConfigError(format!(
                "{at}: the environment variable {var} is not set"
            ))),
        },
        (None, None) => Ok(None),
    }
}

fn one() -> u32 {
    1
}

/// The models an upstream serves.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Models {
    /// Any model (`"*"`).
    #[default]
    Any,
    /// These.
    List(Vec<String>),
}

impl Serialize for Models {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Models::Any => s.serialize_str("*"),
            Models::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Models {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            List(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "*" => Ok(Models::Any),
            Raw::Word(w) => Ok(Models::List(vec![w])),
            Raw::List(l) => Ok(Models::List(l)),
        }
    }
}

impl Models {
    /// Does it serve `model`?
    pub fn serves(&self, model: &str) -> bool {
        match self {
            Models::Any => true,
            Models::List(l) => l.iter().any(|m| m == model),
        }
    }
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
}

impl Upstreams {
    fn replicas(
        &self,
        default_limit: usize,
        default_key: Option<&str>,
        default_backend: backend::Setting,
    ) -> Result<Vec<ReplicaConfig>, ConfigError> {
        let keyed = |origin: Origin, key: Option<&str>, at: &str| match key {
            Some(k) => origin
                .with_api_key(k)
                .map_err(|e| ConfigError(format!("{at}: {e}"))),
            None => Ok(origin),
        };
        match self {
            Upstreams::One(url) => Ok(vec![ReplicaConfig {
                name: "upstream".into(),
                origin: keyed(
                    Origin::parse(url).map_err(|e| ConfigError(format!("upstream: {e}")))?,
                    default_key,
                    "upstream_api_key",
                )?,
                models: Models::Any,
                max_concurrency: default_limit,
                weight: 1,
                backend: default_backend,
                stream_upgrade: None,
            }]),
            Upstreams::Many(entries) if entries.is_empty() => {
                Err(ConfigError("upstream: at least one is needed".into()))
            }
            Upstreams::Many(entries) => {
                let mut out: Vec<ReplicaConfig> = Vec::new();
                for e in entries {
                    let key = format!("upstream `{}`", e.name);
                    if out.iter().any(|r| r.name == e.name) {
                        return Err(ConfigError(format!("{key}: the name is used twice")));
                    }
                    if e.weight == 0 || e.max_concurrency == Some(0) {
                        return Err(ConfigError(format!(
                            "{key}: weight and max_concurrency must be at least 1"
                        )));
                    }
                    if matches!(&e.models, Models::List(l) if l.is_empty()) {
                        return Err(ConfigError(format!(
                            "{key}: models is empty (use \"*\" for any)"
                        )));
                    }
                    let own = upstream_key(&key, e.api_key.as_ref(), e.api_key_env.as_deref())?;
                    out.push(ReplicaConfig {
                        name: e.name.clone(),
                        origin: keyed(
                            Origin::parse(&e.url)
                                .map_err(|err| ConfigError(format!("{key}: url: {err}")))?,
                            own.as_deref().or(default_key),
                            &key,
                        )?,
                        models: e.models.clone(),
                        max_concurrency: e.max_concurrency.unwrap_or(default_limit),
                        weight: e.weight,
                        backend: e.backend.unwrap_or(default_backend),
                        stream_upgrade: e.stream_upgrade,
                    });
                }
                Ok(out)
            }
        }
    }
}

/// `max_concurrency`: a fixed limit, `"auto"` or `"backend"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Concurrency {
    /// At most this many in flight.
    Fixed(usize),
    /// Found by anteroom, within the `auto_*_concurrency` bounds (and never
    /// above the slots the backend reports).
    Auto,
    /// The slots the backend reports, followed live; `"auto"` where it
    /// reports none.
    Backend,
}

impl Concurrency {
    /// Whether anteroom decides the limit (not a number in the config).
    pub fn is_adaptive(self) -> bool {
        !matches!(self, Concurrency::Fixed(_))
    }
}

impl From<usize> for Concurrency {
    fn from(n: usize) -> Self {
        Concurrency::Fixed(n)
    }
}

impl std::str::FromStr for Concurrency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Concurrency::Auto),
            "backend" => Ok(Concurrency::Backend),
            n => n
                .parse()
                .map(Concurrency::Fixed)
                .map_err(|_| format!("`{s}` is not a number, \"auto\" or \"backend\"")),
        }
    }
}

impl Serialize for Concurrency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Concurrency::Fixed(n) => s.serialize_u64(*n as u64),
            Concurrency::Auto => s.serialize_str("auto"),
            Concurrency::Backend => s.serialize_str("backend"),
        }
    }
}

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(usize),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Concurrency::Fixed(n)),
            Raw::Word(w) => w.parse().map_err(serde::de::Error::custom),
        }
    }
}

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
    /// The (first) upstream origin.
    pub upstream: Origin,
    /// Every upstream, with what it serves (one for a plain `upstream = URL`).
    pub replicas: Vec<ReplicaConfig>,
    /// Admission limits.
    pub limits: Limits,
    /// Which requests are admitted.
    pub routes: Routes,
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
    /// The listener's TLS settings, when it serves HTTPS.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// Most time to drain on SIGTERM/SIGINT.
    pub drain_timeout: Duration,
    /// API keys, resolved to digests.
    pub keys: Vec<Key>,
    /// Limits on each client connection.
    pub server: ServerLimits,
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

impl FileConfig {
    /// Read and parse a file; unknown keys are refused.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// Parse TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(e.to_string().trim_end().to_string()))
    }

    /// Check every value and build the runtime config.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let addr = |key: &str, v: &str| {
            v.parse::<SocketAddr>().map_err(|e| {
                ConfigError(format!(
                    "{key}: `{v}` is not an address like 127.0.0.1:8080 ({e})"
                ))
            })
        };
        let listen = addr("listen", &self.listen)?;
        let admin_listen = addr("admin_listen", &self.admin_listen)?;
        if listen == admin_listen && listen.port() != 0 {
            return Err(ConfigError(format!(
                "admin_listen: must differ from listen ({listen})"
            )));
        }
        let first_limit = match self.max_concurrency {
            Concurrency::Fixed(n) => n,
            Concurrency::Auto | Concurrency::Backend => self.auto_min_concurrency,
        };
        let default_key = upstream_key(
            "upstream_api_key",
            Some(&self.upstream_api_key).filter(|k| !k.0.is_empty()),
            Some(self.upstream_api_key_env.trim()).filter(|v| !v.is_empty()),
        )?;
        let mut replicas =
            self.upstream
                .replicas(first_limit, default_key.as_deref(), self.backend)?;
        let ca_file = Some(self.upstream_ca_file.trim())
            .filter(|p| !p.is_empty())
            .map(std::path::Path::new);
        if replicas.iter().any(|r| r.origin.is_https()) || ca_file.is_some() {
            let client = crate::tls::client_config(ca_file).map_err(ConfigError)?;
            for r in &mut replicas {
                r.origin = r
                    .origin
                    .clone()
                    .with_tls(client.clone())
                    .map_err(|e| ConfigError(format!("upstream `{}`: {e}", r.name)))?;
            }
        }
        let tls = match (self.tls_cert.trim(), self.tls_key.trim()) {
            ("", "") => None,
            (cert, key) if !cert.is_empty() && !key.is_empty() => {
                Some(crate::tls::server_config(cert.as_ref(), key.as_ref()).map_err(ConfigError)?)
            }
            _ => {
                return Err(ConfigError(
                    "tls_cert and tls_key: give both (HTTPS) or neither (plain HTTP)".into(),
                ))
            }
        };
        if replicas.len() > 1 && self.max_concurrency.is_adaptive() {
            return Err(ConfigError(format!(
                "max_concurrency: \"{}\" works with one upstream so far; give each [[upstream]] its max_concurrency",
                if self.max_concurrency == Concurrency::Auto { "auto" } else { "backend" }
            )));
        }
        let upstream = replicas[0].origin.clone();
        let keep_model = replicas.len() > 1;
        let (max_concurrency, adaptive) = match self.max_concurrency {
            Concurrency::Fixed(0) => {
                return Err(ConfigError(
                    "max_concurrency: must be at least 1 (or \"auto\")".into(),
                ))
            }
            Concurrency::Fixed(n) => (n, None),
            mode @ (Concurrency::Auto | Concurrency::Backend) => {
                let (min, max) = (self.auto_min_concurrency, self.auto_max_concurrency);
                if min == 0 || min > max {
                    return Err(ConfigError(format!(
                        "auto_min_concurrency / auto_max_concurrency: need 1 <= min <= max, got {min} and {max}"
                    )));
                }
                if mode == Concurrency::Backend
                    && self.backend == backend::Setting::Is(backend::Kind::OpenAi)
                {
                    return Err(ConfigError(
                        "max_concurrency: \"backend\" reads the slots from the backend, which backend = \"openai\" never asks; use \"auto\" or a number".into(),
                    ));
                }
                (
                    min,
                    Some(Adaptive {
                        bounds: AdaptiveBounds { min, max },
                        follow_backend: mode == Concurrency::Backend,
                    }),
                )
            }
        };
        let queue_timeout = positive("queue_timeout", &self.queue_timeout)?;
        let retry_after_cap = positive("retry_after_cap", &self.retry_after_cap)?;
        let upstream_timeout = positive("upstream_timeout", &self.upstream_timeout)?;
        let connect_timeout = positive("connect_timeout", &self.connect_timeout)?;
        let pool_idle_timeout = parse_duration(&self.pool_idle_timeout)
            .map_err(|e| ConfigError(format!("pool_idle_timeout: {e}")))?;
        let retry_base_delay = positive("retry_base_delay", &self.retry_base_delay)?;
        let retry_max_delay = positive("retry_max_delay", &self.retry_max_delay)?;
        if !(0.0..=10.0).contains(&self.retry_budget) {
            return Err(ConfigError(format!(
                "retry_budget: {} must be a share from 0 to 10 (0.2: one retry per five requests)",
                self.retry_budget
            )));
        }
        let reserved: usize = self.reserve.iter().map(|r| r.slots).sum();
        let smallest_limit = match self.max_concurrency {
            Concurrency::Fixed(_) => replicas.iter().map(|r| r.max_concurrency).min(),
            Concurrency::Auto | Concurrency::Backend => Some(self.auto_max_concurrency),
        }
        .unwrap_or(0);
        if self.reserve.iter().any(|r| r.slots == 0) {
            return Err(ConfigError("reserve: slots must be at least 1".into()));
        }
        if reserved > 0 && reserved >= smallest_limit {
            return Err(ConfigError(format!(
                "reserve: {reserved} reserved slots leave nothing of a limit of {smallest_limit} for other work; reserve fewer"
            )));
        }
        let mut levels: Vec<_> = self.reserve.iter().map(|r| r.max_priority).collect();
        levels.sort_unstable();
        if levels.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError(
                "reserve: two reservations for the same max_priority; merge them".into(),
            ));
        }
        if self.preempt && self.max_preemptions == 0 {
            return Err(ConfigError(
                "max_preemptions: at least 1 with preempt on (0 would let nothing be preempted)"
                    .into(),
            ));
        }
        let keys = self.keys()?;
        if self.max_header_bytes < 8192 {
            return Err(ConfigError(
                "max_header_bytes: at least 8192 (hyper's smallest read buffer)".into(),
            ));
        }
        if self.max_headers == 0 {
            return Err(ConfigError("max_headers: must be at least 1".into()));
        }
        let health_interval = positive("health_interval", &self.health_interval)?;
        if !self.health_path.starts_with('/') {
            return Err(ConfigError(format!(
                "health_path: `{}` must be a path starting with /",
                self.health_path
            )));
        }
        if self.eject_after == 0 {
            return Err(ConfigError("eject_after: must be at least 1".into()));
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError("max_body_bytes: must be at least 1".into()));
        }
        if let Some(bad) = self.admit_paths.iter().find(|p| {
            // In normal form but for case, so a disguised spelling of it
            // can be told from it (see crate::path).
            crate::path::normal_form(p) != p.to_ascii_lowercase().as_bytes()
        }) {
            return Err(ConfigError(format!(
                "admit_paths: `{bad}` must be a plain path: starting with /, \
                 no escapes, dot segments, or repeated or trailing slashes"
            )));
        }
        Ok(Config {
            file: self.clone(),
            listen,
            admin_listen,
            admin_key: upstream_key(
                "admin_key_env",
                None,
                Some(self.admin_key_env.trim()).filter(|v| !v.is_empty()),
            )?
            .map(|k| crate::auth::digest(k.trim().as_bytes())),
            upstream,
            replicas,
            limits: Limits {
                max_concurrency,
                max_queue: self.max_queue,
                queue_timeout,
                retry_after_cap,
                reserved: self.reserve.clone(),
                promote_after: match self.promote_after.trim() {
                    "" => None,
                    v => Some(positive("promote_after", v)?),
                },
                preempt: self.preempt.then_some(Preemption {
                    max_priority: self.preempt_max_priority,
                    max_preemptions: self.max_preemptions,
                }),
            },
            routes: Routes {
                admit_paths: self.admit_paths.clone(),
                max_body_bytes: self.max_body_bytes,
                max_buffered_bytes: self.max_buffered_bytes,
                max_passthrough: self.max_passthrough,
                default_priority: self.default_priority,
                keep_model,
                trust_tenant_header: self.trust_tenant_header,
                body_read_timeout: positive("body_read_timeout", &self.body_read_timeout)?,
            },
            client: ClientSettings {
                connect_timeout,
                response_timeout: upstream_timeout,
                pool_idle_timeout,
                stream: StreamTimeouts {
                    first_token: positive("first_token_timeout", &self.first_token_timeout)?,
                    idle: positive("stream_idle_timeout", &self.stream_idle_timeout)?,
                },
                stream_usage: self.stream_usage,
                stream_upgrade: self.stream_upgrade,
            },
            request_log: (!self.request_log.trim().is_empty())
                .then(|| PathBuf::from(self.request_log.trim())),
            adaptive,
            keys,
            server: ServerLimits {
                header_read_timeout: positive("header_read_timeout", &self.header_read_timeout)?,
                client_write_timeout: positive("client_write_timeout", &self.client_write_timeout)?,
                client_idle_timeout: positive("client_idle_timeout", &self.client_idle_timeout)?,
                max_header_bytes: self.max_header_bytes,
                max_headers: self.max_headers,
                max_connections: self.max_connections,
                max_connections_per_ip: self.max_connections_per_ip,
                http2_max_streams: match self.http2_max_streams {
                    0 => return Err(ConfigError("http2_max_streams: must be at least 1".into())),
                    n => n,
                },
            },
            tls,
            drain_timeout: match parse_duration(&self.drain_timeout) {
                Ok(d) => d,
                Err(e) => return Err(ConfigError(format!("drain_timeout: {e}"))),
            },
            workers: match self.workers {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            },
            health: HealthConfig {
                path: self.health_path.clone(),
                interval: health_interval,
                eject_after: self.eject_after,
            },
            retry: RetryPolicy {
                max_retries: self.max_retries,
                base_delay: retry_base_delay,
                max_delay: retry_max_delay,
                budget: self.retry_budget,
            },
        })
    }
}

impl FileConfig {
    /// The `[[key]]`s, each with its digest (reading `env` variables now).
    fn keys(&self) -> Result<Vec<Key>, ConfigError> {
        let mut out: Vec<Key> = Vec::new();
        for k in &self.key {
            let at = format!("key `{}`", k.name);
            if out.iter().any(|o| &*o.name == k.name.as_str()) {
                return Err(ConfigError(format!("{at}: the name is used twice")));
            }
            // Names become metric labels and /status entries.
            let name_ok = !k.name.is_empty()
                && k.name.len() <= 64
                && k.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !name_ok {
                return Err(ConfigError(format!(
                    "{at}: name must be 1 to 64 letters, digits, `.`, `_` or `-`"
                )));
            }
            if k.weight > 1000 {
                return Err(ConfigError(format!("{at}: weight must be from 1 to 1000")));
            }
            if k.max_in_flight == Some(0) {
                return Err(ConfigError(format!(
                    "{at}: max_in_flight must be at least 1 (leave it out for no cap)"
                )));
            }
            let digest = match (&k.sha256, &k.env) {
                (Some(hex), None) => crate::auth::parse_hex_digest(hex)
                    .ok_or_else(|| ConfigError(format!("{at}: sha256 must be 64 hex digits")))?,
                (None, Some(var)) => {
                    let secret = std::env::var(var).map_err(|_| {
                        ConfigError(format!("{at}: the environment variable {var} is not set"))
                    })?;
                    if secret.trim().is_empty() {
                        return Err(ConfigError(format!("{at}: {var} is empty")));
                    }
                    crate::auth::digest(secret.trim().as_bytes())
                }
                _ => {
                    return Err(ConfigError(format!(
                        "{at}: give exactly one of sha256 or env (never the key itself)"
                    )))
                }
            };
            out.push(Key {
                name: k.name.as_str().into(),
                digest,
                default_priority: k.default_priority,
                max_priority: k.max_priority,
                limiter: k.requests_per_minute.and_then(Key::limiter),
                tokens: k.tokens_per_minute.and_then(crate::types::TokenBudget::new),
                requests_per_minute: k.requests_per_minute,
                rate_limited: Default::default(),
                share: crate::types::Share {
                    id: crate::types::key_tenant(&k.name),
                    weight: k.weight.max(1),
                    max_in_flight: k.max_in_flight.unwrap_or(0),
                    name: http::HeaderValue::from_str(&k.name)
                        .map_err(|_| ConfigError(format!("{at}: name is not printable")))?,
                },
            });
        }
        Ok(out)
    }
}

fn positive(key: &str, v: &str) -> Result<Duration, ConfigError> {
    match parse_duration(v) {
        Ok(d) if d > Duration::ZERO => Ok(d),
        Ok(_) => Err(ConfigError(format!("{key}: must be more than zero"))),
        Err(e) => Err(ConfigError(format!("{key}: {e}"))),
    }
}

/// Parse a duration such as `500ms`, `30s`, `1.5s`, `2m` or `1h`.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let s = v.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{v}` needs a unit: ms, s, m or h (e.g. 30s)"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{v}` is not a duration like 30s or 500ms"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("`{v}`: unknown unit `{other}` (use ms, s, m or h)")),
    };
    let secs = n * scale;
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("`{v}` is too long"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "30", "s", "3x", "-1s", "1.2.3s", "ms"] {
            assert!(parse_duration(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn defaults_validate() {
        let c = FileConfig::default().validate().unwrap();
        assert_eq!(c.limits.max_concurrency, 4);
        assert_eq!(c.limits.queue_timeout, Duration::from_secs(180));
        assert_eq!(c.routes.max_body_bytes, 32 * 1024 * 1024);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = FileConfig::parse("max_concurent = 3").unwrap_err();
        assert!(err.0.contains("max_concurent"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("max_concurrency = 0", "max_concurrency"),
            ("queue_timeout = \"soon\"", "queue_timeout"),
            ("queue_timeout = \"0s\"", "queue_timeout"),
            ("upstream = \"localhost:1234\"", "upstream"),
            ("listen = \"nowhere\"", "listen"),
            ("admit_paths = [\"v1/chat\"]", "admit_paths"),
            ("admit_paths = [\"/v1/chat/\"]", "admit_paths"),
            ("admit_paths = [\"/v1/%63hat\"]", "admit_paths"),
            ("max_body_bytes = 0", "max_body_bytes"),
        ];
        for (text, key) in cases {
            let err = FileConfig::parse(text)
                .and_then(|f| f.validate().map(|_| ()))
                .unwrap_err();
            assert!(err.0.contains(key), "{text}: {err}");
        }
        let err = FileConfig::parse("max_queue = \"many\"").unwrap_err();
        assert!(err.0.contains("max_queue"), "{err}");
    }
}
