//! The recorder: where finished records go.

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::Signals;
use super::{Finished, Metrics, RequestLog};

/// Where finished records go: the metrics, and the request log if any.
#[derive(Debug)]
pub struct Recorder {
    /// The Prometheus metrics.
    pub metrics: Metrics,
    /// Latency and push-back, for the adaptive limit.
    pub signals: Arc<Signals>,
    pub(super) log: Option<RequestLog>,
    /// OpenTelemetry traces, when `[traces]` is set.
    pub(super) tracer: Option<Arc<super::Tracer>>,
}

impl Recorder {
    /// A recorder writing the request log to `log_path`, if given.
    pub fn new(log_path: Option<&Path>) -> io::Result<Arc<Self>> {
        let metrics = Metrics::new();
        let log = log_path
            .map(|p| RequestLog::open(p, metrics.log_written.clone(), metrics.log_dropped.clone()))
            .transpose()?;
        Ok(Arc::new(Self {
            metrics,
            signals: Arc::default(),
            log,
            tracer: None,
        }))
    }

    /// A recorder writing the request log to `log_path`, if given, and
    /// exporting traces as `traces` says, if set (its exporter runs on
    /// the current runtime).
    pub fn with_traces(
        log_path: Option<&Path>,
        traces: Option<&crate::config::TracesConfig>,
        extra_ca: Option<&Path>,
    ) -> io::Result<Arc<Self>> {
        let metrics = Metrics::new();
        let log = log_path
            .map(|p| RequestLog::open(p, metrics.log_written.clone(), metrics.log_dropped.clone()))
            .transpose()?;
        let tracer = traces
            .map(|t| super::Tracer::start(t, metrics.registry(), extra_ca))
            .transpose()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("traces: {e}")))?;
        Ok(Arc::new(Self {
            metrics,
            signals: Arc::default(),
            log,
            tracer,
        }))
    }

    /// The tracer, when traces are exported.
    pub fn tracer(&self) -> Option<&Arc<super::Tracer>> {
        self.tracer.as_ref()
    }

    /// Count a finished request and log it.
    pub fn record(&self, finished: Finished, gaps_us: &[u32]) {
        self.metrics.observe(&finished, gaps_us);
        if let Some(t) = &self.tracer {
            t.finished(&finished);
        }
        if let Some(log) = &self.log {
            log.send(finished);
        }
    }

    /// Wait until every record taken so far is written, and every span
    /// exported (or given up on: at most ten seconds).
    pub async fn flush(&self) {
        if let Some(log) = &self.log {
            log.flush().await;
        }
        if let Some(t) = &self.tracer {
            t.flush(std::time::Duration::from_secs(10)).await;
        }
    }
}
