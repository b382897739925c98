//! The config file as written: every key, its default, its TOML form.
//! Parsing checks the form (unknown keys are refused); [`validate`] checks
//! the values.
//!
//! [`validate`]: FileConfig::validate

use serde::{Deserialize, Serialize};

use super::{backend, ConfigError, Reservation};
use crate::types::Priority;

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
    /// `max_tokens` set on an admitted generation that names none (every
    /// upstream's, unless its table sets its own; none: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_max_tokens: Option<u64>,
    /// The most `max_tokens` an admitted generation may ask for; larger
    /// asks are clamped (none: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens_cap: Option<u64>,
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
    /// Answer with OpenAI's `x-ratelimit-*` headers (a key's limits and
    /// the queue's room), for clients that pace themselves by them.
    pub rate_limit_headers: bool,
    /// A queued stream that asks for it is answered (200, SSE) after
    /// waiting this long, and kept alive with a comment every this long
    /// until its first byte. Empty: off.
    pub queue_keepalive: String,
    /// Replicas sharing their limits through Redis: a `[cluster]` table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterEntry>,
    /// OpenTelemetry traces to an OTLP collector: a `[traces]` table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traces: Option<TracesEntry>,
}

/// The `[traces]` table: one OpenTelemetry trace per request, exported to
/// an OTLP collector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracesEntry {
    /// The collector's OTLP/HTTP address, as `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// would give it (`http://127.0.0.1:4318`): spans go to its
    /// `/v1/traces`.
    pub otlp_endpoint: String,
    /// `"http/protobuf"` (the only one so far).
    #[serde(default = "otlp_protocol")]
    pub otlp_protocol: String,
    /// Headers sent with every export (a vendor's API key).
    #[serde(default)]
    pub otlp_headers: std::collections::BTreeMap<String, Secret>,
    /// The share of new traces kept, 0 to 1; a client's `traceparent`
    /// decides for its own trace.
    #[serde(default = "full_ratio")]
    pub sampling_ratio: f64,
    /// `service.name` of the resource.
    #[serde(default = "service_name")]
    pub service_name: String,
    /// More resource attributes (`deployment.environment.name`, …).
    #[serde(default)]
    pub resource_attributes: std::collections::BTreeMap<String, String>,
    /// Longest a finished span waits to be sent.
    #[serde(default = "batch_delay")]
    pub batch_delay: String,
    /// Most finished requests whose spans wait to be sent (a request is
    /// one trace of a few spans); past it new ones are dropped (and
    /// counted).
    #[serde(default = "max_queued_traces")]
    pub max_queued_traces: usize,
    /// Most time one export may take.
    #[serde(default = "export_timeout")]
    pub export_timeout: String,
}

fn otlp_protocol() -> String {
    "http/protobuf".into()
}

fn full_ratio() -> f64 {
    1.0
}

fn service_name() -> String {
    "anteroom".into()
}

fn batch_delay() -> String {
    "1s".into()
}

fn max_queued_traces() -> usize {
    2048
}

fn export_timeout() -> String {
    "10s".into()
}

/// The `[cluster]` table: replicas that share their limits through Redis
/// (or Valkey).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterEntry {
    /// `redis://[:password@]host:port[/db]` or `rediss://…` (TLS).
    #[serde(default)]
    pub redis_url: Secret,
    /// Or: the environment variable that holds it (keeps a password out
    /// of the file).
    #[serde(default)]
    pub redis_url_env: String,
    /// The cluster's name: every key it uses starts with it, so clusters
    /// can share one Redis.
    #[serde(default = "cluster_name")]
    pub name: String,
    /// How long a lease lives without a heartbeat: a replica that dies
    /// gives its slots back after this long.
    #[serde(default = "lease_time")]
    pub lease_time: String,
    /// Most time one call to Redis may take; then it is failed.
    #[serde(default = "redis_timeout")]
    pub timeout: String,
    /// When Redis cannot be reached: `"local"` (this replica admits its
    /// share of each limit alone) or `"closed"` (503). No default: say.
    pub on_unavailable: String,
}

fn cluster_name() -> String {
    "anteroom".into()
}

fn lease_time() -> String {
    "10s".into()
}

fn redis_timeout() -> String {
    "250ms".into()
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
            default_max_tokens: None,
            max_tokens_cap: None,
            upstream_api_key: Secret::default(),
            upstream_api_key_env: String::new(),
            drain_timeout: "25s".into(),
            tls_cert: String::new(),
            tls_key: String::new(),
            upstream_ca_file: String::new(),
            max_connections: 65_536,
            max_connections_per_ip: 0,
            rate_limit_headers: true,
            queue_keepalive: String::new(),
            cluster: None,
            traces: None,
            http2_max_streams: 256,
        }
    }
}

/// `upstream`: one URL, or several `[[upstream]]` tables.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Upstreams {
    /// `upstream = "http://127.0.0.1:1234"`.
    One(String),
    /// `[[upstream]]` tables.
    Many(Vec<UpstreamEntry>),
}

// By hand: serde's untagged enum says only "did not match any variant"
// of a table with a typo in it; this says what is wrong in the table.
impl<'de> Deserialize<'de> for Upstreams {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match toml::Value::deserialize(d)? {
            toml::Value::String(url) => Ok(Upstreams::One(url)),
            v @ toml::Value::Array(_) => Vec::<UpstreamEntry>::deserialize(v)
                .map(Upstreams::Many)
                .map_err(|e| D::Error::custom(format!("[[upstream]]: {}", e.message()))),
            _ => Err(D::Error::custom(
                "upstream is a URL, or [[upstream]] tables",
            )),
        }
    }
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
    /// Its own `default_max_tokens` (default: the top-level one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_max_tokens: Option<u64>,
    /// Its own `max_tokens_cap` (default: the top-level one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens_cap: Option<u64>,
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

fn one() -> u32 {
    1
}

/// The models an upstream serves.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Models {
    /// Any model (`"*"`).
    #[default]
    Any,
    /// These (a `"*"` among them: any other too).
    List(Vec<ModelName>),
}

/// One name in an upstream's `models`: the name clients ask for, and the
/// backend's own name for it when that differs (`{ name = "llama-3-8b",
/// backend = "rig" }`): `model` is rewritten on the way up, and back in
/// the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelName {
    /// What clients ask for (`"*"`: any model).
    pub name: String,
    /// What the backend calls it, if not `name`.
    pub backend: Option<String>,
}

impl From<&str> for ModelName {
    fn from(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            backend: None,
        }
    }
}

impl ModelName {
    /// The backend's name for it.
    pub fn backend_name(&self) -> &str {
        self.backend.as_deref().unwrap_or(&self.name)
    }

    /// Whether it names the backend's model otherwise than clients do.
    pub fn is_alias(&self) -> bool {
        self.backend.as_deref().is_some_and(|b| b != self.name)
    }

    fn is_wildcard(&self) -> bool {
        self.name == "*"
    }
}

impl Serialize for ModelName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match &self.backend {
            None => s.serialize_str(&self.name),
            Some(b) => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("name", &self.name)?;
                m.serialize_entry("backend", b)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for ModelName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            name: String,
            backend: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Table(Table),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "a model is a name, or a table { name = \"…\", backend = \"…\" }",
            )
        })? {
            Raw::Word(name) => Ok(Self {
                name,
                backend: None,
            }),
            Raw::Table(t) => Ok(Self {
                name: t.name,
                backend: t.backend,
            }),
        }
    }
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
            List(Vec<ModelName>),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "models is \"*\", a name, or a list of names and { name, backend } tables",
            )
        })? {
            Raw::Word(w) if w == "*" => Ok(Models::Any),
            Raw::Word(w) => Ok(Models::List(vec![w.as_str().into()])),
            Raw::List(l) => Ok(Models::List(l)),
        }
    }
}

impl Models {
    /// Does it serve `model` (by the name clients use)?
    pub fn serves(&self, model: &str) -> bool {
        self.any() || self.names(model)
    }

    /// Does it name `model` (not only take it as any)?
    pub fn names(&self, model: &str) -> bool {
        match self {
            Models::Any => false,
            Models::List(l) => l.iter().any(|m| !m.is_wildcard() && m.name == model),
        }
    }

    /// Does it take any model (`"*"`, alone or in its list)?
    pub fn any(&self) -> bool {
        match self {
            Models::Any => true,
            Models::List(l) => l.iter().any(ModelName::is_wildcard),
        }
    }

    /// `"*"` alone: any model, each as its backend names it.
    pub fn is_plain_any(&self) -> bool {
        matches!(self, Models::Any)
    }

    /// The names it lists, `"*"` left out.
    pub fn named(&self) -> impl Iterator<Item = &ModelName> {
        let l = match self {
            Models::Any => &[][..],
            Models::List(l) => &l[..],
        };
        l.iter().filter(|m| !m.is_wildcard())
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
    pub(crate) fn is_adaptive(self) -> bool {
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

impl FileConfig {
    /// Parse TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(e.to_string().trim_end().to_string()))
    }
}
