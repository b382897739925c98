//! A proxy serving in the background: both listeners bound, the request
//! path on one runtime or on a thread per worker, the admin listener, the
//! health checks, backend watchers and the adaptive limit.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::admission::Scheduler;
use crate::app::UpstreamBody;
use crate::config::Config;
use crate::drain::Drain;
use crate::route::Clients;
use crate::route::Router;
use crate::telemetry::Recorder;
use crate::upstream::Upstream;

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
    /// The count of client connections against `max_connections` and
    /// `max_connections_per_ip`.
    pub connections: Arc<crate::server::ConnGate>,
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
    let recorder = Recorder::with_traces(
        config.request_log.as_deref(),
        config.traces.as_ref(),
        config.upstream_ca_file.as_deref(),
    )?;
    // Cluster mode: one handle on the shared state for every worker, set
    // before any stack is built.
    let mut cluster_tasks = Vec::new();
    if let Some(c) = &config.cluster {
        let cluster = crate::cluster::Cluster::new(c, recorder.metrics.registry())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        router.set_cluster(cluster.clone());
        cluster_tasks = cluster.start(&router);
    }
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
    let mut tasks = cluster_tasks;
    tasks.push(tokio::spawn(crate::admin::serve(
        admin,
        router.clone(),
        recorder.clone(),
        live.keys.clone(),
        reloader.clone(),
        config.admin_key,
    )));
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
        connections: gate,
        threads,
    })
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
