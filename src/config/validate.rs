//! Validation: every value of a [`FileConfig`] checked, and the [`Config`]
//! the layers take their slices from built from it. Pure: it reads no
//! file, and reads environment variables (the keys named by `*_env`)
//! through the lookup it is given.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::origin::Origin;
use crate::types::TokenBounds;

/// Reads an environment variable: `None` when it is not set.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

impl FileConfig {
    /// Check every value and build the runtime config, reading the
    /// environment variables the file names from the process.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        self.validate_with(&|name| std::env::var(name).ok())
    }

    /// Check every value and build the runtime config, reading the
    /// environment variables the file names through `env`.
    pub fn validate_with(&self, env: Env<'_>) -> Result<Config, ConfigError> {
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
            env,
            "upstream_api_key",
            Some(&self.upstream_api_key).filter(|k| !k.0.is_empty()),
            Some(self.upstream_api_key_env.trim()).filter(|v| !v.is_empty()),
        )?;
        let bounds = TokenBounds {
            default: self.default_max_tokens,
            cap: self.max_tokens_cap,
        };
        let replicas = self.upstream.replicas(
            env,
            first_limit,
            default_key.as_deref(),
            self.backend,
            bounds,
        )?;
        let upstream_ca_file = Some(self.upstream_ca_file.trim())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let tls = match (self.tls_cert.trim(), self.tls_key.trim()) {
            ("", "") => None,
            (cert, key) if !cert.is_empty() && !key.is_empty() => Some(TlsFiles {
                cert: cert.into(),
                key: key.into(),
            }),
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
        let keys = self.keys(env)?;
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
                env,
                "admin_key_env",
                None,
                Some(self.admin_key_env.trim()).filter(|v| !v.is_empty()),
            )?
            .map(|k| crate::types::digest(k.trim().as_bytes())),
            replicas,
            upstream_ca_file,
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
            rules: AdmitRules {
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
            rate_limit_headers: self.rate_limit_headers,
            cluster: self
                .cluster
                .as_ref()
                .map(|c| cluster(c, env))
                .transpose()?,
            traces: self.traces.as_ref().map(traces).transpose()?,
            queue_keepalive: match self.queue_keepalive.trim() {
                "" => None,
                v => match positive("queue_keepalive", v)? {
                    d if d < Duration::from_millis(100) => {
                        return Err(ConfigError(format!(
                            "queue_keepalive: at least 100ms (it is how often each waiting stream gets a comment), not {v}"
                        )))
                    }
                    d => Some(d),
                },
            },
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
    /// The `[[key]]`s, each with its digest (`env` reads the variables
    /// that hold secrets).
    fn keys(&self, env: Env<'_>) -> Result<Vec<KeySetting>, ConfigError> {
        let mut out: Vec<KeySetting> = Vec::new();
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
                (Some(hex), None) => crate::types::parse_hex_digest(hex)
                    .ok_or_else(|| ConfigError(format!("{at}: sha256 must be 64 hex digits")))?,
                (None, Some(var)) => {
                    let secret = env(var).ok_or_else(|| {
                        ConfigError(format!("{at}: the environment variable {var} is not set"))
                    })?;
                    if secret.trim().is_empty() {
                        return Err(ConfigError(format!("{at}: {var} is empty")));
                    }
                    crate::types::digest(secret.trim().as_bytes())
                }
                _ => {
                    return Err(ConfigError(format!(
                        "{at}: give exactly one of sha256 or env (never the key itself)"
                    )))
                }
            };
            if let Some(other) = out.iter().find(|o| o.digest == digest) {
                // One secret can only be one tenant.
                return Err(ConfigError(format!(
                    "{at}: the same secret as key `{}`; give each key its own",
                    other.name
                )));
            }
            out.push(KeySetting {
                name: k.name.as_str().into(),
                digest,
                default_priority: k.default_priority,
                max_priority: k.max_priority,
                requests_per_minute: k.requests_per_minute,
                tokens_per_minute: k.tokens_per_minute,
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

impl Upstreams {
    fn replicas(
        &self,
        env: Env<'_>,
        default_limit: usize,
        default_key: Option<&str>,
        default_backend: backend::Setting,
        bounds: TokenBounds,
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
                max_tokens: token_bounds("top level", bounds)?,
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
                    model_names(&key, &e.models)?;
                    let own =
                        upstream_key(env, &key, e.api_key.as_ref(), e.api_key_env.as_deref())?;
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
                        max_tokens: token_bounds(
                            &key,
                            TokenBounds {
                                default: e.default_max_tokens.or(bounds.default),
                                cap: e.max_tokens_cap.or(bounds.cap),
                            },
                        )?,
                    });
                }
                Ok(out)
            }
        }
    }
}

/// An upstream's `models` as `at` lists them: not empty, each name once,
/// `"*"` with no backend name, and no name JSON would write with escapes
/// (a request's `model` is matched, and an answer's rewritten, as bytes).
fn model_names(at: &str, models: &Models) -> Result<(), ConfigError> {
    let Models::List(list) = models else {
        return Ok(());
    };
    if list.is_empty() {
        return Err(ConfigError(format!(
            "{at}: models is empty (use \"*\" for any)"
        )));
    }
    let plain = |n: &str| !n.is_empty() && !n.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
    for (i, m) in list.iter().enumerate() {
        if !plain(&m.name) || m.backend.as_deref().is_some_and(|b| !plain(b)) {
            return Err(ConfigError(format!(
                "{at}: model {:?}: a name must be non-empty, without quotes, backslashes or control characters",
                m.name
            )));
        }
        if m.name == "*" && m.backend.is_some() {
            return Err(ConfigError(format!(
                "{at}: \"*\" takes any model as it is named: it has no backend name"
            )));
        }
        if list[..i].iter().any(|o| o.name == m.name) {
            return Err(ConfigError(format!(
                "{at}: model {:?} is listed twice",
                m.name
            )));
        }
    }
    Ok(())
}

/// `default_max_tokens` and `max_tokens_cap` as `at` sets them: each at
/// least 1, the default no more than the cap.
fn token_bounds(at: &str, b: TokenBounds) -> Result<TokenBounds, ConfigError> {
    if b.default == Some(0) || b.cap == Some(0) {
        return Err(ConfigError(format!(
            "{at}: default_max_tokens and max_tokens_cap must be at least 1"
        )));
    }
    if let (Some(d), Some(c)) = (b.default, b.cap) {
        if d > c {
            return Err(ConfigError(format!(
                "{at}: default_max_tokens ({d}) is more than max_tokens_cap ({c})"
            )));
        }
    }
    Ok(b)
}

/// The key an upstream is sent: given in the file, or read from `env`.
fn upstream_key(
    vars: Env<'_>,
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
        (None, Some(var)) => match vars(var) {
            Some(v) if !v.trim().is_empty() => Ok(Some(v)),
            Some(_) => Err(ConfigError(format!("{at}: {var} is empty"))),
            None => Err(ConfigError(format!(
                "{at}: the environment variable {var} is not set"
            ))),
        },
        (None, None) => Ok(None),
    }
}

/// `[cluster]`, checked.
fn cluster(
    c: &super::file::ClusterEntry,
    env: Env<'_>,
) -> Result<super::ClusterConfig, ConfigError> {
    let url = match (c.redis_url.0.trim(), c.redis_url_env.trim()) {
        ("", "") => {
            return Err(ConfigError(
                "cluster.redis_url: set it (or cluster.redis_url_env)".into(),
            ))
        }
        (url, "") => url.to_owned(),
        ("", var) => match env(var) {
            Some(v) if !v.trim().is_empty() => v.trim().to_owned(),
            _ => {
                return Err(ConfigError(format!(
                    "cluster.redis_url_env: the environment variable {var} is not set"
                )))
            }
        },
        _ => {
            return Err(ConfigError(
                "cluster: give redis_url or redis_url_env, not both".into(),
            ))
        }
    };
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(ConfigError(
            "cluster.redis_url: must start with redis:// or rediss:// (TLS)".into(),
        ));
    }
    if let Err(e) = redis::Client::open(url.as_str()) {
        // The driver's words, without the URL (it may hold a password).
        return Err(ConfigError(format!(
            "cluster.redis_url: not a valid URL ({:?})",
            e.kind()
        )));
    }
    let name = c.name.trim();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
    {
        return Err(ConfigError(
            "cluster.name: printable, without spaces or braces".into(),
        ));
    }
    let lease_time = positive("cluster.lease_time", &c.lease_time)?;
    if lease_time < Duration::from_secs(1) {
        return Err(ConfigError("cluster.lease_time: at least 1s".into()));
    }
    let timeout = positive("cluster.timeout", &c.timeout)?;
    if timeout * 3 > lease_time {
        return Err(ConfigError(
            "cluster.timeout: at most a third of lease_time (heartbeats renew leases every third of it)"
                .into(),
        ));
    }
    let on_unavailable = match c.on_unavailable.trim() {
        "local" => super::OnUnavailable::Local,
        "closed" => super::OnUnavailable::Closed,
        other => {
            return Err(ConfigError(format!(
                "cluster.on_unavailable: \"local\" or \"closed\", not {other:?}"
            )))
        }
    };
    Ok(super::ClusterConfig {
        redis_url: url,
        name: name.to_owned(),
        lease_time,
        timeout,
        on_unavailable,
    })
}

/// `[traces]`, checked.
fn traces(t: &super::file::TracesEntry) -> Result<super::TracesConfig, ConfigError> {
    match t.otlp_protocol.trim() {
        "http/protobuf" => {}
        "grpc" => {
            return Err(ConfigError(
                "traces.otlp_protocol: \"grpc\" is not supported yet; use \"http/protobuf\" (a collector's port 4318)".into(),
            ))
        }
        other => {
            return Err(ConfigError(format!(
                "traces.otlp_protocol: \"http/protobuf\", not {other:?}"
            )))
        }
    }
    let url = t.otlp_endpoint.trim();
    let base = url.trim_end_matches('/');
    let base = base.strip_suffix("/v1/traces").unwrap_or(base);
    let collector = crate::origin::Origin::parse(base)
        .map_err(|e| ConfigError(format!("traces.otlp_endpoint: {e}")))?;
    let mut headers = http::HeaderMap::new();
    for (name, value) in &t.otlp_headers {
        let n = http::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
            ConfigError(format!(
                "traces.otlp_headers: {name:?} is not a header name"
            ))
        })?;
        let mut v = http::HeaderValue::from_str(value.0.trim()).map_err(|_| {
            ConfigError(format!(
                "traces.otlp_headers.{name}: the value has characters a header cannot carry"
            ))
        })?;
        v.set_sensitive(true);
        headers.insert(n, v);
    }
    if !(0.0..=1.0).contains(&t.sampling_ratio) {
        return Err(ConfigError(format!(
            "traces.sampling_ratio: from 0 to 1, not {}",
            t.sampling_ratio
        )));
    }
    if t.service_name.trim().is_empty() {
        return Err(ConfigError("traces.service_name: cannot be empty".into()));
    }
    if t.max_queued_traces == 0 {
        return Err(ConfigError("traces.max_queued_traces: at least 1".into()));
    }
    Ok(super::TracesConfig {
        collector,
        headers,
        sampling_ratio: t.sampling_ratio,
        service_name: t.service_name.trim().to_owned(),
        resource: t
            .resource_attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        batch_delay: positive("traces.batch_delay", &t.batch_delay)?,
        max_queued_traces: t.max_queued_traces,
        export_timeout: positive("traces.export_timeout", &t.export_timeout)?,
    })
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
        assert_eq!(c.rules.max_body_bytes, 32 * 1024 * 1024);
    }

    #[test]
    fn token_bounds_merge_and_are_checked() {
        let c = FileConfig::parse(
            "default_max_tokens = 256\nmax_tokens_cap = 2048\n\
             [[upstream]]\nname = \"a\"\nurl = \"http://127.0.0.1:1\"\nmodels = [\"m\"]\n\
             [[upstream]]\nname = \"b\"\nurl = \"http://127.0.0.1:2\"\nmodels = [\"n\"]\nmax_tokens_cap = 512\n",
        )
        .unwrap()
        .validate()
        .unwrap();
        let bounds: Vec<_> = c.replicas.iter().map(|r| r.max_tokens).collect();
        let b = |d, c| TokenBounds {
            default: Some(d),
            cap: Some(c),
        };
        assert_eq!(bounds, [b(256, 2048), b(256, 512)]);
        for bad in [
            "default_max_tokens = 0",
            "max_tokens_cap = 0",
            "default_max_tokens = 600\nmax_tokens_cap = 500",
        ] {
            let err = FileConfig::parse(bad).unwrap().validate().unwrap_err();
            assert!(err.0.contains("max_tokens"), "{bad}: {err}");
        }
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
            ("queue_keepalive = \"50ms\"", "queue_keepalive"),
            ("queue_keepalive = \"often\"", "queue_keepalive"),
        ];
        for (text, key) in cases {
            let err = FileConfig::parse(text)
                .and_then(|f| f.validate().map(|_| ()))
                .unwrap_err();
            assert!(err.0.contains(key), "{text}: {err}");
        }
        let on = FileConfig::parse("queue_keepalive = \"15s\"").unwrap();
        assert_eq!(
            on.validate().unwrap().queue_keepalive,
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            FileConfig::default().validate().unwrap().queue_keepalive,
            None
        );
        let err = FileConfig::parse("max_queue = \"many\"").unwrap_err();
        assert!(err.0.contains("max_queue"), "{err}");
    }

    #[test]
    fn the_cluster_table_is_checked_and_says_what_is_wrong() {
        let parse = |t: &str| FileConfig::parse(t).and_then(|f| f.validate());
        let ok =
            parse("[cluster]\nredis_url = \"redis://127.0.0.1:6379\"\non_unavailable = \"local\"")
                .unwrap()
                .cluster
                .unwrap();
        assert_eq!(ok.name, "anteroom");
        assert_eq!(ok.lease_time, Duration::from_secs(10));
        assert_eq!(ok.timeout, Duration::from_millis(250));
        assert_eq!(ok.on_unavailable, super::super::OnUnavailable::Local);
        assert!(
            !format!("{ok:?}").contains("6379"),
            "the URL is never printed"
        );
        let cases = [
            ("[cluster]\non_unavailable = \"local\"", "redis_url"),
            ("[cluster]\nredis_url = \"redis://h\"", "on_unavailable"),
            ("[cluster]\nredis_url = \"redis://h\"\non_unavailable = \"open\"", "on_unavailable"),
            ("[cluster]\nredis_url = \"http://h\"\non_unavailable = \"local\"", "redis_url"),
            ("[cluster]\nredis_url = \"redis://h\"\non_unavailable = \"local\"\nlease_time = \"500ms\"", "lease_time"),
            ("[cluster]\nredis_url = \"redis://h\"\non_unavailable = \"local\"\ntimeout = \"5s\"", "timeout"),
            ("[cluster]\nredis_url = \"redis://h\"\non_unavailable = \"local\"\nname = \"a b\"", "name"),
            ("[cluster]\nredis_url = \"redis://h\"\non_unavailable = \"local\"\nredis = 1", "redis"),
        ];
        for (text, key) in cases {
            let err = parse(text).map(|_| ()).unwrap_err();
            assert!(err.0.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn secrets_are_read_through_the_lookup_given() {
        let mut f = FileConfig::parse(
            "upstream_api_key_env = \"UP\"\nadmin_key_env = \"ADMIN\"\n\
             [[key]]\nname = \"a\"\nenv = \"KEY_A\"\n",
        )
        .unwrap();
        let vars = |name: &str| {
            let v = match name {
                "UP" => "sk-up",
                "ADMIN" => " sk-admin ",
                "KEY_A" => "sk-a",
                _ => return None,
            };
            Some(v.to_string())
        };
        let c = f.validate_with(&vars).unwrap();
        assert_eq!(c.keys[0].digest, crate::types::digest(b"sk-a"));
        assert_eq!(c.admin_key, Some(crate::types::digest(b"sk-admin")));
        assert_eq!(
            format!("{:?}", c.replicas[0].origin.authorization()),
            "Some(Sensitive)"
        );
        // Unset, or set but blank: refused, naming the variable.
        let err = f.validate_with(&|_| None).unwrap_err().0;
        assert!(err.contains("UP") && err.contains("not set"), "{err}");
        f.upstream_api_key_env.clear();
        f.admin_key_env.clear();
        let blank = |name: &str| (name == "KEY_A").then(|| "  ".to_string());
        let err = f.validate_with(&blank).unwrap_err().0;
        assert!(err.contains("KEY_A is empty"), "{err}");
    }

    #[test]
    fn a_secret_given_to_two_keys_is_refused() {
        let hex: String = crate::types::digest(b"sk-1")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let text = format!(
            "[[key]]\nname = \"a\"\nsha256 = \"{hex}\"\n\
             [[key]]\nname = \"b\"\nenv = \"SAME\"\n"
        );
        let f = FileConfig::parse(&text).unwrap();
        let err = f.validate_with(&|_| Some("sk-1".into())).unwrap_err().0;
        assert!(err.contains("key `b`") && err.contains("key `a`"), "{err}");
        assert!(f.validate_with(&|_| Some("sk-2".into())).is_ok());
    }
}
