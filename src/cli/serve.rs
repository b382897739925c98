//! `anteroom serve`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::admission::Scheduler;
use crate::app::UpstreamBody;
use crate::config::{Config, ConfigError, FileConfig};
use crate::drain::Drain;
use crate::route::Clients;
use crate::route::Router;
use crate::telemetry::Recorder;
use crate::upstream::Upstream;
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

/// A running proxy: its addresses and scheduler.
#[derive(Debug)]
pub struct Running {
    /// Where the proxy listens.
    pub addr: std::net::SocketAddr,
    /// Where the admin listener listens.
    pub admin_addr: std::net::SocketAddr,
    /// The admission state (of the first upstream).
    pub scheduler: Arc<Scheduler>,
    /// The admission state of each upstream at start, in config order.
    pub schedulers: Vec<Arc<Scheduler>>,
    /// Metrics and the request log.
    pub recorder: Arc<Recorder>,
    /// The (first) upstream client (its connection pool).
    pub upstream: Upstream<UpstreamBody>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Tells the accept loops to stop and drain, by this deadline.
    stop: tokio::sync::watch::Sender<Option<Instant>>,
    /// The accept loop on this runtime (one worker).
    serving: Option<tokio::task::JoinHandle<()>>,
    /// Streams watch it to end at the drain deadline.
    drain: Drain,
    /// Applies config reloads (SIGHUP, POST /reload).
    pub reloader: Arc<crate::reload::Reloader>,
    /// The upstreams as they are now (a reload may change them).
    pub router: Arc<Router>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Running {
    /// Stop serving at once: what is in flight is dropped (see
    /// [`drain`](Self::drain) for the graceful way).
    pub async fn shutdown(self) {
        self.drain(Duration::ZERO).await;
    }

    /// Stop accepting and drain for at most `timeout` (see
    /// [`drain`](crate::drain)): waiters that cannot start and finish in
    /// time get 503 `shutting_down`, running requests finish (streams still
    /// running at the deadline end with an error event), and this returns
    /// when every connection has closed or was dropped after the deadline.
    /// The request log is not flushed here: the caller does that last.
    pub async fn drain(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.drain.begin(deadline);
        // Every upstream's, those a reload added or removed included.
        let schedulers = self.router.all_schedulers();
        for s in &schedulers {
            s.drain(deadline);
        }
        let _ = self.stop.send(Some(deadline));
        // As the deadline nears, answer the waiters that can no longer
        // start in time (no release may come to do it).
        let shedding = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                for s in &schedulers {
                    s.shed_late();
                }
            }
        });
        if let Some(serving) = self.serving.take() {
            let _ = serving.await;
        }
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        shedding.abort();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.send(Some(Instant::now()));
        self.router.close();
        for t in &self.tasks {
            t.abort();
        }
        if let Some(t) = &self.serving {
            t.abort();
        }
    }
}

/// Bind both listeners and serve in the background, on the caller's runtime.
pub async fn start(config: &Config) -> std::io::Result<Running> {
    start_with(config, 1).await
}

/// Like [`start`], with the proxy listener served by `workers` threads of
/// their own when `workers > 1`: each a single-threaded tokio runtime with
/// its own `SO_REUSEPORT` listening socket (the kernel spreads connections)
/// and its own upstream connection pools. A request then lives on one
/// thread from accept to last byte, with no work-stealing hand-offs between
/// threads (about two `futex` calls per request on tokio's multi-threaded
/// runtime); admission, metrics, the request log and the admin listener
/// are shared.
pub async fn start_with(config: &Config, workers: usize) -> std::io::Result<Running> {
    let app = crate::app::build(config)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.0))?;
    start_app(config, app, workers).await
}

/// Like [`start_with`], for a config whose runtime `app` is built.
pub async fn start_app(
    config: &Config,
    app: crate::app::App,
    workers: usize,
) -> std::io::Result<Running> {
    let crate::app::App { tls, router, live } = app;
    let listeners = bind_proxy(config.listen, workers).await?;
    let admin = TcpListener::bind(config.admin_listen).await?;
    let addr = listeners[0].local_addr()?;
    let admin_addr = admin.local_addr()?;
    let recorder = Recorder::new(config.request_log.as_deref())?;
    let schedulers = router.all_schedulers();
    let reloader = Arc::new(crate::reload::Reloader::new(
        config.file.clone(),
        live.clone(),
        router.clone(),
    ));
    if config.admin_key.is_none() && !admin_addr.ip().is_loopback() {
        tracing::warn!(
            admin = %admin_addr,
            "the admin listener is beyond loopback with no admin key: anyone who can reach it can read /status and /metrics and POST /reload (set admin_key_env)"
        );
    }
    let mut tasks = vec![tokio::spawn(crate::admin::serve(
        admin,
        router.clone(),
        recorder.clone(),
        live.keys.clone(),
        reloader.clone(),
        config.admin_key,
    ))];
    let (stop, stopped) = tokio::sync::watch::channel(None::<Instant>);
    let drain = Drain::new();
    let mut serving = None;
    // One count of client connections across every worker.
    let gate = crate::server::ConnGate::new(&config.server);
    let mut threads = Vec::new();
    let mut first_upstream = None;
    let mut listeners = listeners.into_iter();
    if workers <= 1 {
        let listener = listeners.next().expect("one listener");
        let (stack, clients) = proxy_stack(config, &live, &router, &recorder, &drain);
        first_upstream = clients.client(None);
        tasks.push(tokio::spawn(clients.housekeeping()));
        serving = Some(tokio::spawn(crate::server::serve(
            listener,
            stack,
            stop_requested(stopped.clone()),
            config.server,
            tls.clone(),
            gate.clone(),
        )));
    } else {
        for (i, listener) in listeners.enumerate() {
            let listener = listener.into_std()?;
            let (config, router, recorder) = (config.clone(), router.clone(), recorder.clone());
            let (stopped, drain, gate) = (stopped.clone(), drain.clone(), gate.clone());
            let (live, tls) = (live.clone(), tls.clone());
            let (ready, upstream) = std::sync::mpsc::channel();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("anteroom-worker-{i}"))
                    .spawn(move || {
                        let rt = match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(rt) => rt,
                            Err(e) => {
                                tracing::error!(error = %e, "worker runtime failed");
                                return;
                            }
                        };
                        rt.block_on(async move {
                            let listener = match TcpListener::from_std(listener) {
                                Ok(l) => l,
                                Err(e) => {
                                    tracing::error!(error = %e, "worker listener failed");
                                    return;
                                }
                            };
                            let (stack, clients) =
                                proxy_stack(&config, &live, &router, &recorder, &drain);
                            let _ = ready.send(clients.client(None));
                            tokio::spawn(clients.housekeeping());
                            let shutdown = stop_requested(stopped);
                            crate::server::serve(
                                listener,
                                stack,
                                shutdown,
                                config.server,
                                tls,
                                gate,
                            )
                            .await;
                        });
                    })?,
            );
            if first_upstream.is_none() {
                first_upstream = tokio::task::spawn_blocking(move || upstream.recv().ok())
                    .await
                    .ok()
                    .flatten()
                    .flatten();
            }
        }
    }
    // Probes run while there are several upstreams (a reload may add some).
    router.start_health_checks(config.health.clone());
    // Every upstream's backend is identified now and every health_interval.
    router.start_watching_backends(config.health.interval);
    let scheduler = schedulers[0].clone();
    if let Some(adaptive) = config.adaptive {
        tasks.push(tokio::spawn(crate::route::run_adaptive(
            router.clone(),
            recorder.signals.clone(),
            adaptive,
        )));
    }
    let upstream =
        first_upstream.ok_or_else(|| std::io::Error::other("no proxy worker started"))?;
    Ok(Running {
        addr,
        admin_addr,
        scheduler,
        schedulers,
        recorder,
        upstream,
        tasks,
        stop,
        serving,
        drain,
        reloader,
        router,
        threads,
    })
}

/// SIGHUP, listened for from before the listeners accept: a SIGHUP sent
/// the moment the process is ready (an `ExecReload`, a test) would
/// otherwise find no handler and kill the process, or be lost where the
/// signal is ignored (under `nohup`).
#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

fn listen_for_hangup() -> Hangup {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: reload with POST /reload");
                None
            }
        }
    }
}

/// Reload the config on every SIGHUP until dropped.
async fn reload_on_sighup(reloader: Arc<crate::reload::Reloader>, hup: Hangup) {
    #[cfg(unix)]
    {
        let Some(mut hup) = hup else { return };
        while hup.recv().await.is_some() {
            match reloader.reload() {
                Ok(what) => tracing::info!(%what, "config reloaded (SIGHUP)"),
                Err(e) => {
                    tracing::error!(error = %e, "config reload refused; the running config stays")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (reloader, hup);
        std::future::pending::<()>().await;
    }
}

/// The drain deadline, once a stop is requested (now, if the sender is gone).
async fn stop_requested(mut stopped: tokio::sync::watch::Receiver<Option<Instant>>) -> Instant {
    match stopped.wait_for(Option::is_some).await {
        Ok(d) => d.unwrap_or_else(Instant::now),
        Err(_) => Instant::now(),
    }
}

/// The proxy's request path for one runtime: its own upstream pools.
fn proxy_stack(
    config: &Config,
    live: &crate::reload::Live,
    router: &Arc<Router>,
    recorder: &Arc<Recorder>,
    drain: &Drain,
) -> (crate::app::Stack, Clients<UpstreamBody>) {
    let clients = Clients::new(router.clone(), &config.client, Some(drain.clone()));
    let stack = crate::app::build_stack_with(
        config,
        live,
        router.clone(),
        recorder.clone(),
        clients.clone(),
    );
    (stack, clients)
}

/// The proxy's listening sockets: one, or `workers` sharing the address
/// with `SO_REUSEPORT` (the first decides the port when it is 0).
async fn bind_proxy(
    addr: std::net::SocketAddr,
    workers: usize,
) -> std::io::Result<Vec<TcpListener>> {
    if workers <= 1 {
        return Ok(vec![TcpListener::bind(addr).await?]);
    }
    let mut out: Vec<TcpListener> = Vec::new();
    let mut at = addr;
    for _ in 0..workers {
        let socket = if at.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        #[cfg(unix)]
        socket.set_reuseport(true)?;
        socket.bind(at)?;
        let listener = socket.listen(1024)?;
        at = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// `anteroom serve`: run until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs) -> Result<(), BoxError> {
    let config = args.config()?;
    // Each waiting client holds a descriptor, and so does its upstream
    // connection once it runs: the soft limit (often 1024) binds long before
    // max_connections. Raised to the hard limit, as nginx's
    // worker_rlimit_nofile would be set.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let hangup = listen_for_hangup();
    let app = crate::app::build(&config)?;
    let running = start_app(&config, app, config.workers).await.map_err(|e| {
        format!(
            "cannot start (listen on {} and {}, open the request log): {e}",
            config.listen, config.admin_listen
        )
    })?;
    // Reloads re-read the file and apply the same flags on top.
    let source_args = args.clone();
    running
        .reloader
        .set_source(Box::new(move || source_args.file_config()));
    let hup = tokio::spawn(reload_on_sighup(running.reloader.clone(), hangup));
    if config.keys.is_empty() && !running.addr.ip().is_loopback() {
        tracing::warn!(
            listen = %running.addr,
            "listening beyond loopback with no API keys: anyone who can reach this port can use the backend (add [[key]] entries)"
        );
    }
    tracing::info!(
        listen = %running.addr,
        admin = %running.admin_addr,
        upstream = %config.replicas[0].origin.authority(),
        max_concurrency = config.limits.max_concurrency,
        max_queue = config.limits.max_queue,
        workers = config.workers,
        "anteroom serving"
    );
    super::shutdown_signal().await;
    hup.abort();
    tracing::info!(drain_timeout = ?config.drain_timeout, "shutting down: draining");
    // Stop taking requests, let running ones finish, then write out every
    // record. A second signal cuts the drain short.
    let recorder = running.recorder.clone();
    let drain_timeout = config.drain_timeout;
    tokio::select! {
        _ = running.drain(drain_timeout) => {}
        _ = super::shutdown_signal() => tracing::warn!("second signal: not waiting for the drain"),
    }
    recorder.flush().await;
    tracing::info!("stopped");
    Ok(())
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
