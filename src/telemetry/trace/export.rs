//! The exporter's task: finished requests in, OTLP/HTTP batches out.
//!
//! Spans are sent when 512 are waiting or the oldest has waited
//! `batch_delay`, one export at a time, each bounded by `export_timeout`.
//! A failed export is not retried (the spans are counted as dropped and
//! the next batch is tried afresh): a retry would hold the queue behind a
//! collector that is down, and the queue is what must never fill up
//! because of it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::notes::Ids;
use super::{spans, Msg, TraceMetrics};
use crate::config::TracesConfig;
use crate::origin::Origin;
use crate::upstream::Pool;

/// Most spans in one export (the SDK's default batch).
const MAX_BATCH: usize = 512;

/// OTLP/HTTP's path for traces.
const PATH: &str = "/v1/traces";

pub(super) struct Exporter {
    collector: Origin,
    pool: Arc<Pool<Full<Bytes>>>,
    headers: HeaderMap,
    resource: Resource,
    batch_delay: Duration,
    timeout: Duration,
    metrics: TraceMetrics,
    ids: Arc<Ids>,
    /// The last export failed (logged once until one succeeds).
    failing: bool,
}

impl Exporter {
    pub(super) fn new(
        config: &TracesConfig,
        extra_ca: Option<&std::path::Path>,
        metrics: TraceMetrics,
        ids: Arc<Ids>,
    ) -> Result<Self, String> {
        let collector = match config.collector.is_https() {
            true => config
                .collector
                .clone()
                .with_tls(crate::tls::client_config(extra_ca)?)?,
            false => config.collector.clone(),
        };
        let mut attributes = vec![string("service.name", &config.service_name)];
        attributes.push(string("service.version", env!("CARGO_PKG_VERSION")));
        attributes.extend(
            config
                .resource
                .iter()
                .filter(|(k, _)| k != "service.name")
                .map(|(k, v)| string(k, v)),
        );
        Ok(Self {
            pool: Pool::new(
                collector.clone(),
                config.export_timeout,
                Duration::from_secs(30),
            ),
            collector,
            headers: config.headers.clone(),
            resource: Resource {
                attributes,
                dropped_attributes_count: 0,
                entity_refs: Vec::new(),
            },
            batch_delay: config.batch_delay,
            timeout: config.export_timeout,
            metrics,
            ids,
            failing: false,
        })
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut batch: Vec<Span> = Vec::new();
        let mut due: Option<Instant> = None;
        loop {
            let msg = match due {
                Some(at) => tokio::select! {
                    m = rx.recv() => m,
                    () = tokio::time::sleep_until(at) => {
                        self.export(&mut batch).await;
                        due = None;
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            match msg {
                Some(Msg::Finished(f)) => {
                    if let Some(notes) = f.tap.trace() {
                        spans::build(notes, &f, &self.ids, &mut batch);
                    }
                    if batch.len() >= MAX_BATCH {
                        self.export(&mut batch).await;
                        due = None;
                    } else if due.is_none() {
                        due = Some(Instant::now() + self.batch_delay);
                    }
                }
                Some(Msg::Flush(done)) => {
                    self.export(&mut batch).await;
                    due = None;
                    let _ = done.send(());
                }
                None => {
                    self.export(&mut batch).await;
                    return;
                }
            }
        }
    }

    /// Send `batch` (emptying it); count what was accepted and what not.
    async fn export(&mut self, batch: &mut Vec<Span>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let body = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "anteroom".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        attributes: Vec::new(),
                        dropped_attributes_count: 0,
                    }),
                    spans: std::mem::take(batch),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
        .encode_to_vec();
        let result = tokio::time::timeout(self.timeout, self.send(body)).await;
        let rejected = match result {
            Ok(Ok(rejected)) => {
                if std::mem::replace(&mut self.failing, false) {
                    tracing::info!("trace export works again");
                }
                rejected.min(n)
            }
            Ok(Err(e)) => return self.failed(n, &e),
            Err(_) => return self.failed(n, "timed out"),
        };
        self.metrics.exported.inc_by(n - rejected);
        if rejected > 0 {
            self.metrics
                .dropped
                .with_label_values(&["rejected"])
                .inc_by(rejected);
        }
    }

    fn failed(&mut self, spans: u64, why: &str) {
        self.metrics
            .dropped
            .with_label_values(&["export_failed"])
            .inc_by(spans);
        if !std::mem::replace(&mut self.failing, true) {
            tracing::warn!(
                collector = %self.collector.authority(),
                error = why,
                "trace export failed; spans are dropped (and counted) until it works again"
            );
        }
    }

    /// POST one batch; the spans the collector says it rejected.
    async fn send(&self, body: Vec<u8>) -> Result<u64, String> {
        let mut req = Request::post(self.collector.path_for(PATH))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let h = req.headers_mut();
        h.insert(http::header::HOST, self.collector.host_header().clone());
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        for (k, v) in &self.headers {
            h.insert(k, v.clone());
        }
        let resp = self
            .pool
            .clone()
            .send(req)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        // Read to the end: the connection is then reused.
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("the collector answered {status}"));
        }
        // A partial success names how many spans it refused.
        Ok(ExportTraceServiceResponse::decode(body)
            .ok()
            .and_then(|r| r.partial_success)
            .map_or(0, |p| p.rejected_spans.max(0) as u64))
    }
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        key_strindex: 0,
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
    }
}
