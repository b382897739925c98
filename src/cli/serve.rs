//! `anteroom serve`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use tokio::net::TcpListener;

use crate::admission::Scheduler;
use crate::app::UpstreamBody;
use crate::config::{Config, ConfigError, FileConfig};
use crate::route::Router;
use crate::telemetry::Recorder;
use crate::upstream::{Upstream, Upstreams};
use crate::BoxError;

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
    /// Most requests in flight at the upstream, or "auto" (key:
    /// max_concurrency).
    #[arg(long, value_name = "N|auto")]
    pub max_concurrency: Option<crate::config::Concurrency>,
    /// Lowest limit of "auto" (key: auto_min_concurrency).
    #[arg(long, value_name = "N")]
    pub auto_min_concurrency: Option<usize>,
    /// Highest limit of "auto" (key: auto_max_concurrency).
    #[arg(long, value_name = "N")]
    pub auto_max_concurrency: Option<usize>,
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
}

impl ServeArgs {
    /// The config file (or the defaults) with these flags applied.
    pub fn file_config(&self) -> Result<FileConfig, ConfigError> {
        let mut f = match &self.config {
            Some(path) => FileConfig::load(path)?,
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
            eject_after
        );
        if !self.admit_paths.is_empty() {
            f.admit_paths = self.admit_paths.clone();
        }
        Ok(f)
    }

    /// The validated config.
    pub fn config(&self) -> Result<Config, ConfigError> {
        self.file_config()?.validate()
    }
}

/// A running proxy: its addresses and scheduler.
#[derive(Debug)]
pub struct Running {
    /// Where the proxy listens.
    pub addr: std::net::SocketAddr,
    /// Where the admin listener listens.
    pub admin_addr: std::net::SocketAddr,
    /// The admission state (of the first upstream).
    pub scheduler: Arc<Scheduler>,
    /// The admission state of each upstream, in config order.
    pub schedulers: Vec<Arc<Scheduler>>,
    /// Metrics and the request log.
    pub recorder: Arc<Recorder>,
    /// The (first) upstream client (its connection pool).
    pub upstream: Upstream<UpstreamBody>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Bind both listeners and serve in the background.
pub async fn start(config: &Config) -> std::io::Result<Running> {
    let listener = TcpListener::bind(config.listen).await?;
    let admin = TcpListener::bind(config.admin_listen).await?;
    let addr = listener.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let recorder = Recorder::new(config.request_log.as_deref())?;
    // Per upstream: its own scheduler (its own limit and queue) and pool.
    let schedulers: Vec<Arc<Scheduler>> = config
        .replicas
        .iter()
        .map(|r| {
            Scheduler::new(crate::admission::Limits {
                max_concurrency: r.max_concurrency,
                ..config.limits.clone()
            })
        })
        .collect();
    let upstreams: Vec<Upstream<UpstreamBody>> = config
        .replicas
        .iter()
        .map(|r| Upstream::new(r.origin.clone(), &config.client))
        .collect();
    let router = Router::new(
        config.replicas.clone(),
        schedulers.clone(),
        config.health.eject_after,
        config.health.interval,
    );
    let stack = crate::app::build_stack_with(
        config,
        router.clone(),
        recorder.clone(),
        Upstreams::new(upstreams.clone(), router.clone()),
    );
    let named: Vec<(String, Arc<Scheduler>)> = config
        .replicas
        .iter()
        .map(|r| r.name.clone())
        .zip(schedulers.iter().cloned())
        .collect();
    let mut tasks = vec![
        tokio::spawn(crate::server::serve(
            listener,
            stack,
            std::future::pending(),
        )),
        tokio::spawn(crate::admin::serve(admin, named, recorder.clone())),
    ];
    for u in &upstreams {
        tasks.push(tokio::spawn(u.clone().housekeeping()));
    }
    if router.len() > 1 {
        for (i, r) in config.replicas.iter().enumerate() {
            tasks.push(tokio::spawn(crate::route::health_checks(
                router.clone(),
                i,
                r.origin.clone(),
                config.health.clone(),
            )));
        }
    }
    let scheduler = schedulers[0].clone();
    let upstream = upstreams[0].clone();
    if let Some(bounds) = config.adaptive {
        tasks.push(tokio::spawn(crate::admission::adaptive::run(
            scheduler.clone(),
            recorder.signals.clone(),
            bounds,
        )));
    }
    Ok(Running {
        addr,
        admin_addr,
        scheduler,
        schedulers,
        recorder,
        upstream,
        tasks,
    })
}

/// `anteroom serve`: run until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs) -> Result<(), BoxError> {
    let config = args.config()?;
    let running = start(&config).await.map_err(|e| {
        format!(
            "cannot start (listen on {} and {}, open the request log): {e}",
            config.listen, config.admin_listen
        )
    })?;
    tracing::info!(
        listen = %running.addr,
        admin = %running.admin_addr,
        upstream = %config.upstream.authority(),
        max_concurrency = config.limits.max_concurrency,
        max_queue = config.limits.max_queue,
        "anteroom serving"
    );
    super::shutdown_signal().await;
    tracing::info!("shutting down");
    // Stop taking requests, then write out every record already taken.
    let recorder = running.recorder.clone();
    drop(running);
    recorder.flush().await;
    Ok(())
}
