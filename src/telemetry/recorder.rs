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
        }))
    }

    /// Count a finished request and log it.
    pub fn record(&self, finished: Finished, gaps_us: &[u32]) {
        self.metrics.observe(&finished, gaps_us);
        if let Some(log) = &self.log {
            log.send(finished);
        }
    }

    /// Wait until every record taken so far is written (no-op without a log).
    pub async fn flush(&self) {
        if let Some(log) = &self.log {
            log.flush().await;
        }
    }
}
