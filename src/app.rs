//! Assembling the proxy: the one place where the order of the layers is decided.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder};

use crate::admission::AdmissionLayer;
use crate::auth::AuthLayer;
use crate::backoff::BackoffLayer;
use crate::classify::{ClassifiedBody, ClassifyLayer};
use crate::cluster::ClusterLayer;
use crate::config::{Config, ConfigError, FileConfig};
use crate::edge::EdgeLayer;
use crate::keepalive::KeepAliveLayer;
use crate::reload::Live;
use crate::route::Clients;
use crate::route::{RouteLayer, Router};
use crate::telemetry::{Recorder, TelemetryLayer};
use crate::{Body, BoxError};

/// The whole proxy as one cloneable service: what the server runs per request.
pub type Stack = BoxCloneSyncService<Request<Incoming>, Response<Body>, Infallible>;

/// The request body the upstream client sends: buffered for admitted requests,
/// streamed for the rest.
pub type UpstreamBody = ClassifiedBody<Incoming>;

/// Read and parse the config file at `path`; unknown keys are refused.
pub fn read_config(path: &std::path::Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    FileConfig::parse(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
}

/// What a [`Config`] needs read from disk and created before it serves:
/// the listener's TLS settings, the upstream table (TLS attached to its
/// `https://` upstreams, a scheduler per upstream), and the settings a
/// reload may replace (keys with their limiters, admit rules).
#[derive(Debug)]
pub struct App {
    /// The listener's TLS settings, when it serves HTTPS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The upstream table.
    pub router: Arc<Router>,
    /// Keys, admit rules and the bounds shared by every stack.
    pub live: Live,
}

/// Read what `config` names (certificates, keys, CA files) and create its
/// runtime state. Errors name the key and the file.
pub fn build(config: &Config) -> Result<App, ConfigError> {
    let tls = config
        .tls
        .as_ref()
        .map(|f| crate::tls::server_config(&f.cert, &f.key))
        .transpose()
        .map_err(ConfigError)?;
    let mut replicas = config.replicas.clone();
    crate::upstream::secure(&mut replicas, config.upstream_ca_file.as_deref())?;
    let schedulers = replicas
        .iter()
        .map(|r| {
            crate::admission::Scheduler::new(crate::config::Limits {
                max_concurrency: r.max_concurrency,
                ..config.limits.clone()
            })
        })
        .collect();
    let router = Router::new(
        replicas,
        schedulers,
        config.health.eject_after,
        config.health.interval,
    );
    Ok(App {
        tls,
        router,
        live: Live::new(config),
    })
}

/// Build the proxy for `config`, admitting through `app`'s schedulers
/// (one per upstream) and recording into `recorder`.
pub fn build_stack(config: &Config, app: &App, recorder: Arc<Recorder>) -> Stack {
    let clients = Clients::<UpstreamBody>::new(app.router.clone(), &config.client, None);
    build_stack_with(config, &app.live, app.router.clone(), recorder, clients)
}

/// Build the proxy around any upstream service.
/// `live` holds the settings a reload may replace (keys, admit rules).
pub(crate) fn build_stack_with<U, B>(
    config: &Config,
    live: &Live,
    router: Arc<Router>,
    recorder: Arc<Recorder>,
    upstream: U,
) -> Stack
where
    U: Service<Request<UpstreamBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    U::Error: Into<BoxError>,
    U::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // Inside the slot: a request the upstream refuses waits and goes
    // again without losing its place; below the response's way out, so a
    // refusal the client never sees can be retried. Innermost: the pooled
    // client to the model server.
    let sending =
        BackoffLayer::new(config.retry.clone(), recorder.clone(), router.clone()).layer(upstream);
    // In cluster mode, between admission and back-off: the replica's slot
    // taken, wait for the cluster's lease. Two stacks, so that without it
    // a request pays nothing for it.
    match router.cluster().cloned() {
        Some(cluster) => {
            let leasing = ClusterLayer::new(cluster, router.clone(), config.limits.queue_timeout)
                .layer(sending);
            around(config, live, router, recorder, leasing)
        }
        None => around(config, live, router, recorder, sending),
    }
}

/// The stack around `inner`, the service that sends an admitted request
/// (back-off and the upstream client, in cluster mode behind the lease).
fn around<S, B>(
    config: &Config,
    live: &Live,
    router: Arc<Router>,
    recorder: Arc<Recorder>,
    inner: S,
) -> Stack
where
    S: Service<Request<UpstreamBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // Layers added first see the request first; this reads top-down like the
    // request path in the crate docs.
    let below = ServiceBuilder::new()
        // Times the request and keeps its one record; inside the rescue so
        // it sees errors as errors (with their code), outside everything
        // else so its clock starts at arrival and stops at the last byte.
        .layer(TelemetryLayer::new(recorder.clone()).rate_limit_headers(config.rate_limit_headers))
        // Who is asking: a 401 before anything is buffered or queued, but
        // recorded (inside telemetry); the key's name is the tenant.
        .layer(AuthLayer::shared(live.keys.clone()))
        // Decide admitted or not and read the priority; buffers admitted
        // bodies, so a 400/413 is answered before the request takes a place.
        .layer(
            ClassifyLayer::shared(live.rules.clone())
                .counting(live.buffered.clone())
                .keepalive(config.queue_keepalive.is_some()),
        )
        // With several upstreams, pick one by the body's model (least
        // outstanding work); needs the model, so after classify, and
        // before admission, which queues on that upstream's scheduler.
        .layer(RouteLayer::new(router.clone()))
        // Queue by priority, hold a slot until the response body ends.
        .layer(AdmissionLayer::new(router.clone()).passing(live.passing.clone()))
        .service(inner);
    // Outermost: every error from below becomes an OpenAI-shaped response
    // carrying the request id, and the body is boxed once. With
    // `queue_keepalive`, inside it and outside telemetry (whose record is
    // then of the answer, not of the comments): a queued stream that
    // asked is answered early. Two stacks, so that without it a request
    // pays nothing for it.
    match config.queue_keepalive {
        Some(every) => BoxCloneSyncService::new(
            ServiceBuilder::new()
                .layer(EdgeLayer)
                .layer(
                    KeepAliveLayer::new(every).counting(recorder.metrics.queue_keepalives.clone()),
                )
                .service(below),
        ),
        None => BoxCloneSyncService::new(EdgeLayer.layer(below)),
    }
}
