//! The flags of `anteroom serve`: one per config key, each overriding the
//! file; a test checks them against the schema both ways.

use std::path::PathBuf;

use clap::Args;

use crate::config::{Config, ConfigError, FileConfig};

/// Flags of `anteroom serve`: one per config key, each overriding the file.
#[derive(Clone, Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML config file; flags override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The model server, e.g. http://127.0.0.1:1234 (key: upstream).
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// Proxy listen address (key: listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin listen address for /healthz and /status (key: admin_listen).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Most requests in flight at the upstream, "auto" or "backend" (key:
    /// max_concurrency).
    #[arg(long, value_name = "N|auto|backend")]
    pub max_concurrency: Option<crate::config::Concurrency>,
    /// Lowest limit of "auto" (key: auto_min_concurrency).
    #[arg(long, value_name = "N")]
    pub auto_min_concurrency: Option<usize>,
    /// Highest limit of "auto" (key: auto_max_concurrency).
    #[arg(long, value_name = "N")]
    pub auto_max_concurrency: Option<usize>,
    /// What the upstream is: auto, llama.cpp, vllm, ollama, lmstudio or
    /// openai (key: backend).
    #[arg(long, value_name = "KIND")]
    pub backend: Option<crate::config::backend::Setting>,
    /// Most requests waiting (key: max_queue).
    #[arg(long, value_name = "N")]
    pub max_queue: Option<usize>,
    /// Most time a request waits, e.g. 180s (key: queue_timeout).
    #[arg(long, value_name = "DURATION")]
    pub queue_timeout: Option<String>,
    /// Ceiling of the advised Retry-After (key: retry_after_cap).
    #[arg(long, value_name = "DURATION")]
    pub retry_after_cap: Option<String>,
    /// Largest buffered request body in bytes (key: max_body_bytes).
    #[arg(long, value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Most time to the upstream's response headers (key: upstream_timeout).
    #[arg(long, value_name = "DURATION")]
    pub upstream_timeout: Option<String>,
    /// Most time to connect to the upstream (key: connect_timeout).
    #[arg(long, value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// How long idle upstream connections are kept (key: pool_idle_timeout).
    #[arg(long, value_name = "DURATION")]
    pub pool_idle_timeout: Option<String>,
    /// A path whose POSTs are admitted; repeat for several; replaces the
    /// list (key: admit_paths).
    #[arg(long = "admit-path", value_name = "PATH")]
    pub admit_paths: Vec<String>,
    /// Priority of requests that name none (key: default_priority).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub default_priority: Option<i32>,
    /// Append one JSON line per request to this file (key: request_log).
    #[arg(long, value_name = "PATH")]
    pub request_log: Option<String>,
    /// Most retries of a request the upstream refused (key: max_retries).
    #[arg(long, value_name = "N")]
    pub max_retries: Option<u32>,
    /// First back-off delay without upstream advice (key: retry_base_delay).
    #[arg(long, value_name = "DURATION")]
    pub retry_base_delay: Option<String>,
    /// Longest wait for one retry (key: retry_max_delay).
    #[arg(long, value_name = "DURATION")]
    pub retry_max_delay: Option<String>,
    /// Retries as a share of recent requests (key: retry_budget).
    #[arg(long, value_name = "SHARE")]
    pub retry_budget: Option<f64>,
    /// Most time to a stream's first data (key: first_token_timeout).
    #[arg(long, value_name = "DURATION")]
    pub first_token_timeout: Option<String>,
    /// Most time between a stream's data (key: stream_idle_timeout).
    #[arg(long, value_name = "DURATION")]
    pub stream_idle_timeout: Option<String>,
    /// Path several upstreams are probed at (key: health_path).
    #[arg(long, value_name = "PATH")]
    pub health_path: Option<String>,
    /// How often they are probed (key: health_interval).
    #[arg(long, value_name = "DURATION")]
    pub health_interval: Option<String>,
    /// Consecutive failures that take one out of service (key: eject_after).
    #[arg(long, value_name = "N")]
    pub eject_after: Option<u32>,
    /// Threads serving the proxy port, 0 for one per core (key: workers).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Reserve SLOTS for priority MAX_PRIORITY or more urgent, as
    /// MAX_PRIORITY:SLOTS; repeat for several levels; replaces the list
    /// (key: reserve).
    #[arg(long = "reserve", value_name = "MAX_PRIORITY:SLOTS", value_parser = parse_reservation, allow_hyphen_values = true)]
    pub reserve: Vec<crate::config::Reservation>,
    /// Let an urgent request take the slot of a less urgent one that has
    /// not answered yet, which waits and goes again (key: preempt).
    #[arg(long, value_name = "BOOL")]
    pub preempt: Option<bool>,
    /// The least urgent priority that may preempt (key:
    /// preempt_max_priority).
    #[arg(long, value_name = "PRIORITY", allow_hyphen_values = true)]
    pub preempt_max_priority: Option<i32>,
    /// Most times one request is preempted (key: max_preemptions).
    #[arg(long, value_name = "N")]
    pub max_preemptions: Option<u32>,
    /// Most bytes of admitted bodies held at once (key: max_buffered_bytes).
    #[arg(long, value_name = "BYTES")]
    pub max_buffered_bytes: Option<usize>,
    /// Most requests passing through without admission at once (key:
    /// max_passthrough).
    #[arg(long, value_name = "N")]
    pub max_passthrough: Option<usize>,
    /// The environment variable holding the admin key (key: admin_key_env).
    #[arg(long, value_name = "VAR")]
    pub admin_key_env: Option<String>,
    /// Most time to receive a request's headers (key: header_read_timeout).
    #[arg(long, value_name = "DURATION")]
    pub header_read_timeout: Option<String>,
    /// Most time a write to a client may stay blocked (key:
    /// client_write_timeout).
    #[arg(long, value_name = "DURATION")]
    pub client_write_timeout: Option<String>,
    /// Most time an HTTP/2 client connection may have no request open (key:
    /// client_idle_timeout).
    #[arg(long, value_name = "DURATION")]
    pub client_idle_timeout: Option<String>,
    /// Most time between two pieces of a request body (key:
    /// body_read_timeout).
    #[arg(long, value_name = "DURATION")]
    pub body_read_timeout: Option<String>,
    /// Largest request head in bytes (key: max_header_bytes).
    #[arg(long, value_name = "BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Most request headers (key: max_headers).
    #[arg(long, value_name = "N")]
    pub max_headers: Option<usize>,
    /// Serve a request that waited this long before any other, whatever its
    /// priority; "" for never (key: promote_after).
    #[arg(long, value_name = "DURATION")]
    pub promote_after: Option<String>,
    /// Without keys, take the tenant from x-tenant (key: trust_tenant_header).
    #[arg(long, value_name = "BOOL")]
    pub trust_tenant_header: Option<bool>,
    /// Ask a vLLM upstream for streams' usage and take it out of the
    /// answer (key: stream_usage).
    #[arg(long, value_name = "BOOL")]
    pub stream_usage: Option<bool>,
    /// Send a llama.cpp upstream non-streamed requests as streams, for a
    /// true time to first token (key: stream_upgrade).
    #[arg(long, value_name = "BOOL")]
    pub stream_upgrade: Option<bool>,
    /// Answer with OpenAI's x-ratelimit-* headers (key: rate_limit_headers).
    #[arg(long, value_name = "BOOL")]
    pub rate_limit_headers: Option<bool>,
    /// A queued stream that asks (x-anteroom-queue-keepalive: 1) is answered
    /// after waiting this long, with an SSE comment every this long until
    /// its first byte; "" for off (key: queue_keepalive).
    #[arg(long, value_name = "DURATION")]
    pub queue_keepalive: Option<String>,
    /// The environment variable holding the key to send the upstream
    /// (key: upstream_api_key_env). The key itself can only be given in
    /// the file (upstream_api_key): a flag would show in `ps`.
    #[arg(long, value_name = "VAR")]
    pub upstream_api_key_env: Option<String>,
    /// On SIGTERM/SIGINT, most time to let running requests finish
    /// (key: drain_timeout).
    #[arg(long, value_name = "DURATION")]
    pub drain_timeout: Option<String>,
    /// Serve HTTPS with this PEM certificate chain (key: tls_cert).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<String>,
    /// The certificate's PEM private key (key: tls_key).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<String>,
    /// Extra PEM CA certificates for https:// upstreams (key: upstream_ca_file).
    #[arg(long, value_name = "FILE")]
    pub upstream_ca_file: Option<String>,
    /// Most client connections open at once, 0 for no limit
    /// (key: max_connections).
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Most connections from one address, 0 for no limit
    /// (key: max_connections_per_ip).
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<usize>,
    /// Most concurrent HTTP/2 streams per connection (key: http2_max_streams).
    #[arg(long, value_name = "N")]
    pub http2_max_streams: Option<u32>,
}

fn parse_reservation(v: &str) -> Result<crate::config::Reservation, String> {
    let (p, n) = v
        .split_once(':')
        .ok_or_else(|| format!("`{v}`: write MAX_PRIORITY:SLOTS, e.g. 0:1"))?;
    Ok(crate::config::Reservation {
        max_priority: p
            .trim()
            .parse()
            .map_err(|_| format!("`{p}` is not a priority"))?,
        slots: n
            .trim()
            .parse()
            .map_err(|_| format!("`{n}` is not a number of slots"))?,
    })
}

impl ServeArgs {
    /// The config file (or the defaults) with these flags applied.
    pub fn file_config(&self) -> Result<FileConfig, ConfigError> {
        let mut f = match &self.config {
            Some(path) => crate::app::read_config(path)?,
            None => FileConfig::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = &self.$field { f.$field = v.clone(); }
            )*};
        }
        if let Some(url) = &self.upstream {
            f.upstream = url.as_str().into();
        }
        set!(
            listen,
            admin_listen,
            max_concurrency,
            auto_min_concurrency,
            auto_max_concurrency,
            backend,
            max_queue,
            queue_timeout,
            retry_after_cap,
            max_body_bytes,
            upstream_timeout,
            connect_timeout,
            pool_idle_timeout,
            default_priority,
            request_log,
            max_retries,
            retry_base_delay,
            retry_max_delay,
            retry_budget,
            first_token_timeout,
            stream_idle_timeout,
            health_path,
            health_interval,
            eject_after,
            workers,
            header_read_timeout,
            max_buffered_bytes,
            max_passthrough,
            admin_key_env,
            client_write_timeout,
            client_idle_timeout,
            body_read_timeout,
            max_header_bytes,
            max_headers,
            promote_after,
            preempt,
            preempt_max_priority,
            max_preemptions,
            trust_tenant_header,
            stream_usage,
            stream_upgrade,
            rate_limit_headers,
            queue_keepalive,
            upstream_api_key_env,
            drain_timeout,
            tls_cert,
            tls_key,
            upstream_ca_file,
            max_connections,
            max_connections_per_ip,
            http2_max_streams
        );
        if !self.admit_paths.is_empty() {
            f.admit_paths = self.admit_paths.clone();
        }
        if !self.reserve.is_empty() {
            f.reserve = self.reserve.clone();
        }
        Ok(f)
    }

    /// The validated config.
    pub fn config(&self) -> Result<Config, ConfigError> {
        self.file_config()?.validate()
    }
}

#[cfg(test)]
mod tests {
    use clap::Args as _;

    use super::*;

    /// Keys only a file can set: tables and lists of tables.
    const FILE_ONLY: &[&str] = &["key", "upstream_api_key"];
    /// Repeatable flags, named in the singular: one value each time.
    const SINGULAR: &[(&str, &str)] = &[("admit_path", "admit_paths")];

    fn flags() -> Vec<(String, String)> {
        ServeArgs::augment_args(clap::Command::new("serve"))
            .get_arguments()
            .filter_map(|a| {
                let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                let flag = a.get_long()?.replace('-', "_");
                let key = SINGULAR
                    .iter()
                    .find(|(f, _)| *f == flag)
                    .map_or(flag, |(_, k)| k.to_string());
                Some((key, help))
            })
            .filter(|(name, _)| name != "config")
            .collect()
    }

    fn keys() -> Vec<String> {
        let file = toml::Value::try_from(FileConfig::default()).expect("the defaults serialise");
        file.as_table().expect("a table").keys().cloned().collect()
    }

    /// A key is added in one place, the schema: a flag for a key that does
    /// not exist, or a key with no flag (and not file-only), fails here.
    #[test]
    fn every_flag_is_a_config_key_and_every_key_has_a_flag() {
        let (flags, keys) = (flags(), keys());
        for (flag, help) in &flags {
            assert!(keys.contains(flag), "--{flag} sets no config key");
            assert!(
                help.replace('\n', " ").contains(&format!("(key: {flag})")),
                "--{flag}'s help does not name its key: {help}"
            );
        }
        for key in &keys {
            assert!(
                flags.iter().any(|(f, _)| f == key) || FILE_ONLY.contains(&key.as_str()),
                "config key `{key}` has no flag of `anteroom serve` (or add it to FILE_ONLY)"
            );
        }
    }
}
