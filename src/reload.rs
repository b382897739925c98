//! Hot reload: SIGHUP or `POST /reload` on the admin listener re-reads the
//! config file (the command-line flags still override it), validates it,
//! and applies it without dropping a queued or running request.
//!
//! What changes live:
//! - upstreams: `[[upstream]]`s added, removed or given a new address or
//!   key ([`Router::reconfigure`](crate::route::Router::reconfigure)). An
//!   upstream is known by its name (a single upstream before and after is
//!   the same one whatever its name): it keeps its queue, and its
//!   connections unless its address or key changed. A new one starts with
//!   an empty queue; a removed one takes no new request, its waiters are
//!   queued at the others (with their priority and deadline; a 404
//!   `model_not_found` if no other serves their model) and its running
//!   requests finish on their connections. Each one's `max_concurrency`,
//!   `weight`, `models` and `stream_upgrade` change in place;
//! - limits: `max_concurrency` (fixed; also each `[[upstream]]`'s own),
//!   `max_queue`, `queue_timeout`, `retry_after_cap`, `reserve`,
//!   `promote_after`: each scheduler takes them in place
//!   ([`Scheduler::reconfigure`](crate::admission::Scheduler::reconfigure));
//!   waiting requests keep their place and deadline, a lowered limit lets
//!   running requests finish;
//! - priorities and admit rules: `default_priority`, `admit_paths`,
//!   `max_body_bytes`, `trust_tenant_header`: swapped in for the next
//!   request;
//! - keys: `[[key]]` added, removed or changed, for the next request; a key
//!   that stays keeps its rate-limit state ([`carry_over`]);
//! - `backend` (top-level or an `[[upstream]]`'s): the upstream is
//!   identified anew.
//!
//! Anything else (listen addresses, TLS and `upstream_ca_file`, timeouts,
//! retry policy, health checks, workers, the request log, and switching
//! `max_concurrency` between a number, `"auto"` and `"backend"`) needs a restart, which the drain
//! makes lossless: a reload that changes any of it is refused as a whole,
//! naming the keys, and the running config stays. A file that does not
//! parse or validate is refused the same way.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::auth::{carry_over, SharedKeys};
use crate::classify::SharedAdmitRules;
use crate::config::{Concurrency, Config, ConfigError, FileConfig};

/// The settings the request path reads that a reload may replace.
#[derive(Clone, Debug)]
pub struct Live {
    /// API keys.
    pub keys: SharedKeys,
    /// Which requests are admitted, their default priority, body bound.
    pub rules: SharedAdmitRules,
    /// The admitted bodies held now (kept across reloads).
    pub buffered: Arc<crate::classify::Buffered>,
    /// The requests passing without admission now, and their bound.
    pub passing: Arc<crate::admission::passing::Passing>,
}

impl Live {
    /// The settings of `config`.
    pub fn new(config: &Config) -> Self {
        Self {
            keys: Arc::new(arc_swap::ArcSwap::from_pointee(crate::auth::Keys::new(
                config.keys.iter().map(crate::auth::Key::new).collect(),
            ))),
            rules: Arc::new(arc_swap::ArcSwap::from_pointee(config.rules.clone())),
            buffered: Arc::default(),
            passing: crate::admission::passing::Passing::new(config.rules.max_passthrough),
        }
    }
}

/// Where a reload reads the config from: the file and flags of the command
/// line, as at start.
pub type Source = Box<dyn Fn() -> Result<FileConfig, ConfigError> + Send + Sync>;

/// Applies reloads to a running proxy.
pub struct Reloader {
    live: Live,
    router: Arc<crate::route::Router>,
    source: Mutex<Option<Source>>,
    /// The config file as last applied.
    current: Mutex<FileConfig>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

/// The top-level keys a reload may change.
const LIVE_KEYS: &[&str] = &[
    "max_concurrency",
    "max_queue",
    "queue_timeout",
    "retry_after_cap",
    "reserve",
    "preempt",
    "preempt_max_priority",
    "max_preemptions",
    "promote_after",
    "default_priority",
    "admit_paths",
    "max_body_bytes",
    "max_buffered_bytes",
    "max_passthrough",
    "body_read_timeout",
    "trust_tenant_header",
    "key",
    "upstream",
    "upstream_api_key",
    "upstream_api_key_env",
    "backend",
];

impl Reloader {
    /// A reloader for a proxy started from `file`, with these live
    /// settings and upstreams.
    pub fn new(file: FileConfig, live: Live, router: Arc<crate::route::Router>) -> Self {
        Self {
            live,
            router,
            source: Mutex::new(None),
            current: Mutex::new(file),
        }
    }

    /// Read reloads from `source` (without one, a reload is refused).
    pub fn set_source(&self, source: Source) {
        *self.source.lock() = Some(source);
    }

    /// Re-read the source and apply it. `Ok` says what changed; `Err` says
    /// why nothing was applied.
    pub fn reload(&self) -> Result<String, ConfigError> {
        let next = match &*self.source.lock() {
            Some(source) => source()?,
            None => {
                return Err(ConfigError(
                    "no config file to reload from (start with --config FILE)".into(),
                ))
            }
        };
        self.apply(next)
    }

    /// Validate `next` and apply it (see the [module docs](self)).
    pub fn apply(&self, next: FileConfig) -> Result<String, ConfigError> {
        let mut validated = next.validate()?;
        crate::upstream::secure(
            &mut validated.replicas,
            validated.upstream_ca_file.as_deref(),
        )?;
        let mut current = self.current.lock();
        let restart = restart_only_changes(&current, &next);
        if !restart.is_empty() {
            return Err(ConfigError(format!(
                "{} cannot change without a restart (SIGTERM drains without loss); nothing was applied",
                restart.join(", ")
            )));
        }
        let mut changed = changed_keys(&current, &next);
        let adaptive = next.max_concurrency.is_adaptive();
        let set = self
            .router
            .reconfigure(validated.replicas.clone(), &validated.limits, adaptive);
        for (what, names) in [
            ("added", &set.added),
            ("removed", &set.removed),
            ("re-addressed", &set.readdressed),
        ] {
            if !names.is_empty() {
                tracing::info!(upstreams = %names.join(", "), "upstreams {what}");
                changed.push(format!("upstreams {what}: {}", names.join(", ")));
            }
        }
        let old_keys = self.live.keys.load_full();
        self.live
            .keys
            .store(Arc::new(crate::auth::Keys::new(carry_over(
                old_keys.as_slice(),
                validated.keys.iter().map(crate::auth::Key::new).collect(),
            ))));
        self.live.rules.store(Arc::new(validated.rules.clone()));
        self.live.passing.set_max(validated.rules.max_passthrough);
        *current = next;
        Ok(if changed.is_empty() {
            "reloaded: nothing changed".to_string()
        } else {
            format!("reloaded: {}", changed.join(", "))
        })
    }
}

/// The config as a TOML table, for comparing key by key.
fn table(f: &FileConfig) -> toml::Table {
    toml::Table::try_from(f).unwrap_or_default()
}

/// Top-level keys whose values differ.
fn changed_keys(a: &FileConfig, b: &FileConfig) -> Vec<String> {
    let (a, b) = (table(a), table(b));
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Keys that changed but cannot change live.
fn restart_only_changes(a: &FileConfig, b: &FileConfig) -> Vec<String> {
    let mut out: Vec<String> = changed_keys(a, b)
        .into_iter()
        .filter(|k| !LIVE_KEYS.contains(&k.as_str()))
        .collect();
    let mode = |f: &FileConfig| match f.max_concurrency {
        Concurrency::Fixed(_) => "a number",
        Concurrency::Auto => "\"auto\"",
        Concurrency::Backend => "\"backend\"",
    };
    if mode(a) != mode(b) {
        out.push(format!("max_concurrency from {} to {}", mode(a), mode(b)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_keys_pass_and_others_are_named() {
        let a = FileConfig::default();
        let mut b = a.clone();
        b.max_queue = 10;
        b.default_priority = 3;
        assert!(restart_only_changes(&a, &b).is_empty());
        assert_eq!(changed_keys(&a, &b), ["default_priority", "max_queue"]);
        b.upstream = "http://127.0.0.1:2".into();
        assert!(restart_only_changes(&a, &b).is_empty());
        b.listen = "127.0.0.1:9".into();
        b.upstream_timeout = "1s".into();
        assert_eq!(restart_only_changes(&a, &b), ["listen", "upstream_timeout"]);
    }
}
