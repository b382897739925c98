//! OpenTelemetry traces: one trace per request, exported to an OTLP
//! collector over HTTP (`http/protobuf`), beside the metrics and the log.
//!
//! Off (no `[traces]` table), a request pays one `Option` check where its
//! tap is made and one where it is sent upstream: no id, no header, no
//! allocation. On, each request gets ids when it arrives (continuing the
//! client's `traceparent`, or starting a trace sampled by ratio); each
//! attempt upstream is sent a `traceparent` naming its own span, so the
//! backend's spans (vLLM's `--otlp-traces-endpoint`) nest under it; and
//! when the request's record is finished, a sampled request's record goes
//! to the exporter's task, which turns it into spans ([`spans`]) and sends
//! them in batches.
//!
//! Export never holds a request up: the queue to the exporter is bounded
//! (`max_queued_traces`), a record that finds it full is dropped, and
//! every span dropped (queue full, export failed, refused by the
//! collector) is counted in `anteroom_trace_spans_dropped_total{reason}`.
//!
//! Not the OpenTelemetry SDK's tracer and batch processor: its processor
//! exports on a thread of its own by blocking on each export, which cannot
//! drive our tokio-based client; it counts dropped spans only in a log line
//! at shutdown; and its spans are built on the request path (a builder, an
//! attribute list, then the SDK's span data and a conversion to OTLP).
//! Here the wire types come from `opentelemetry-proto`, the client is the
//! upstream's own connection pool, and a span is built once, from the
//! record, off the request path.

pub(crate) mod context;
mod export;
mod notes;
mod spans;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::{mpsc, oneshot};

use notes::keeps;
use notes::Ids;
pub(crate) use notes::TraceNotes;

use super::Finished;
use crate::config::TracesConfig;

/// What goes to the exporter's task.
enum Msg {
    Finished(Box<Finished>),
    Flush(oneshot::Sender<()>),
}

/// Traces' counters on `/metrics`.
#[derive(Clone, Debug)]
pub(crate) struct TraceMetrics {
    pub(crate) exported: IntCounter,
    pub(crate) dropped: IntCounterVec,
}

impl TraceMetrics {
    fn new(registry: &Registry) -> Self {
        let exported = IntCounter::with_opts(Opts::new(
            "anteroom_trace_spans_exported_total",
            "Spans the OTLP collector accepted.",
        ))
        .expect("valid metric");
        let dropped = IntCounterVec::new(
            Opts::new(
                "anteroom_trace_spans_dropped_total",
                "Spans not exported, by reason: queue_full (the exporter was behind), export_failed (the collector could not be reached, timed out or answered an error), rejected (the collector refused them).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for reason in ["queue_full", "export_failed", "rejected"] {
            dropped.with_label_values(&[reason]);
        }
        // Registered once per recorder; a second registration (a second
        // tracer in one process's tests) would fail and is harmless.
        let _ = registry.register(Box::new(exported.clone()));
        let _ = registry.register(Box::new(dropped.clone()));
        Self { exported, dropped }
    }
}

/// Begins each request's trace and hands finished ones to the exporter.
#[derive(Debug)]
pub struct Tracer {
    ratio: f64,
    ids: Arc<Ids>,
    tx: mpsc::Sender<Msg>,
    metrics: TraceMetrics,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Finished(_) => "Finished",
            Msg::Flush(_) => "Flush",
        })
    }
}

impl Tracer {
    /// A tracer exporting as `config` says, its counters in `registry`; its
    /// exporter runs on the current runtime.
    pub(crate) fn start(
        config: &TracesConfig,
        registry: &Registry,
        extra_ca: Option<&std::path::Path>,
    ) -> Result<Arc<Self>, String> {
        let (tx, rx) = mpsc::channel(config.max_queued_traces);
        let ids = Arc::new(Ids::new());
        let metrics = TraceMetrics::new(registry);
        let exporter = export::Exporter::new(config, extra_ca, metrics.clone(), ids.clone())?;
        tokio::spawn(exporter.run(rx));
        Ok(Arc::new(Self {
            ratio: config.sampling_ratio,
            ids,
            tx,
            metrics,
        }))
    }

    /// A request's trace, from its headers: the client's continued
    /// (sampled as the client decided) or a new one (sampled by ratio).
    pub(crate) fn begin(&self, headers: &HeaderMap) -> Box<TraceNotes> {
        let parent = context::Parent::of(headers);
        let (trace_id, sampled) = match &parent {
            Some(p) => (p.trace_id, p.sampled),
            None => {
                let id = self.ids.trace_id();
                (id, keeps(&id, self.ratio))
            }
        };
        Box::new(TraceNotes {
            trace_id,
            span_id: self.ids.span_id(),
            parent,
            sampled,
            attempts: parking_lot::Mutex::new(Vec::new()),
            ids: self.ids.clone(),
        })
    }

    /// A finished request: its spans are exported if it was sampled; if
    /// the exporter is too far behind, they are dropped and counted.
    pub(crate) fn finished(&self, f: &Finished) {
        let Some(notes) = f.tap.trace().filter(|n| n.sampled) else {
            return;
        };
        if self
            .tx
            .try_send(Msg::Finished(Box::new(f.clone())))
            .is_err()
        {
            self.metrics
                .dropped
                .with_label_values(&["queue_full"])
                .inc_by(spans::count(notes, f));
        }
    }

    /// Wait until every span finished so far has been exported (or given
    /// up on), for at most `within`.
    pub(crate) async fn flush(&self, within: Duration) {
        let (done, wait) = oneshot::channel();
        let _ = tokio::time::timeout(within, async {
            if self.tx.send(Msg::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        })
        .await;
    }
}
