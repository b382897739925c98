//! Prometheus metrics, named after vLLM's (`vllm:time_to_first_token_seconds`
//! → `anteroom_time_to_first_token_seconds`) so dashboards translate.
//!
//! Label sets are bounded: `priority` is the priority itself from −20 to 20
//! and `"<-20"` / `">20"` beyond, never a raw client string; `status` is an
//! HTTP status code; `reason` and `outcome` are anteroom's own fixed words.
//! Label handles are resolved once per label value and cached, so recording
//! a request costs atomic adds and no map lookup or lock.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::record::{Finished, Outcome};
use crate::types::Priority;
use crate::types::QueueStatus;

/// Priorities with a label of their own; the rest share `<-20` / `>20`.
const LABELLED: std::ops::RangeInclusive<Priority> = -20..=20;
const CLASSES: usize = 43;

/// Latency buckets (seconds) for waits and whole requests: milliseconds to
/// ten minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 320.0, 640.0,
];
/// Per-token buckets (seconds): a fast GPU to a slow CPU.
const TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
];

/// The label value of a priority.
pub(crate) fn priority_label(p: Priority) -> String {
    if p < *LABELLED.start() {
        format!("<{}", LABELLED.start())
    } else if p > *LABELLED.end() {
        format!(">{}", LABELLED.end())
    } else {
        p.to_string()
    }
}

fn class_of(p: Priority) -> usize {
    (p.clamp(LABELLED.start() - 1, LABELLED.end() + 1) - (LABELLED.start() - 1)) as usize
}

/// Handles for one priority class.
#[derive(Debug)]
struct ByPriority {
    queue: Histogram,
    ttft: Histogram,
    backend_ttft: Histogram,
    backend_wait: Histogram,
    itl: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
}

/// All of anteroom's metrics, in a registry of their own.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    queue: HistogramVec,
    ttft: HistogramVec,
    backend_ttft: HistogramVec,
    backend_wait: HistogramVec,
    itl: HistogramVec,
    tpot: HistogramVec,
    e2e: HistogramVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    preemptions: IntCounterVec,
    preempted_seconds: prometheus::CounterVec,
    requests: IntCounterVec,
    rejections: IntCounterVec,
    waiting: IntGaugeVec,
    running: IntGaugeVec,
    max_concurrency: IntGauge,
    max_queue: IntGauge,
    backend_info: IntGaugeVec,
    backend_slots: IntGaugeVec,
    backend_running: IntGaugeVec,
    backend_waiting: IntGaugeVec,
    reserved_used: IntGaugeVec,
    reserved_free: IntGaugeVec,
    /// Records the request log could not take (its channel was full).
    pub log_dropped: IntCounter,
    /// Records written to the request log.
    pub log_written: IntCounter,
    /// Times an upstream 429/503 paused the upstream for everyone.
    pub upstream_pauses: IntCounter,
    /// Requests that came with `x-stainless-retry-count` > 0: the client's
    /// own retries.
    pub client_retries: IntCounter,
    /// Streams answered early (`queue_keepalive`) because they waited.
    pub queue_keepalives: IntCounter,
    retries: [IntCounter; 4],
    given_up: IntCounterVec,
    tenant_requests: IntCounterVec,
    tenant_tokens: IntCounterVec,
    by_priority: [OnceLock<ByPriority>; CLASSES],
    by_status: Box<[OnceLock<IntCounter>]>,
    by_outcome: [IntCounter; 5],
    names: Vec<String>,
}

fn histogram(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("metric definitions are valid")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("metric definitions are valid")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definitions are valid")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The registry they are in (cluster mode adds its own).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Create and register every metric.
    pub fn new() -> Self {
        let p = &["priority"];
        let queue = histogram(
            "anteroom_request_queue_time_seconds",
            "Time from arrival to dispatch to the upstream (for rejected requests: to the rejection).",
            LATENCY_BUCKETS,
            p,
        );
        let ttft = histogram(
            "anteroom_time_to_first_token_seconds",
            "Time from arrival to the first generated token handed to the client, queue included.",
            LATENCY_BUCKETS,
            p,
        );
        let backend_ttft = histogram(
            "anteroom_backend_time_to_first_token_seconds",
            "Time from dispatch to the first generated token: the backend's own time to first token.",
            LATENCY_BUCKETS,
            p,
        );
        let backend_wait = histogram(
            "anteroom_backend_wait_seconds",
            "Time a request waited inside the backend before its prompt was processed, where the backend reports its timings (llama.cpp): above a few milliseconds, the queue has moved into the backend.",
            LATENCY_BUCKETS,
            p,
        );
        let itl = histogram(
            "anteroom_inter_token_latency_seconds",
            "Gap between consecutive token events of a stream.",
            TOKEN_BUCKETS,
            p,
        );
        let tpot = histogram(
            "anteroom_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            TOKEN_BUCKETS,
            p,
        );
        let e2e = histogram(
            "anteroom_e2e_request_latency_seconds",
            "Time from arrival to the last byte handed to the client.",
            LATENCY_BUCKETS,
            p,
        );
        let prompt_tokens = counter(
            "anteroom_prompt_tokens_total",
            "Prompt tokens of finished requests, from the backend's usage.",
            p,
        );
        let generation_tokens = counter(
            "anteroom_generation_tokens_total",
            "Generated tokens of finished requests (usage, else counted token events).",
            p,
        );
        let preemptions = counter(
            "anteroom_preemptions_total",
            "Times a running request was stopped before it answered so that a more urgent one could take its slot (preempt), by the stopped request's priority; counted when its record is written.",
            p,
        );
        let preempted_seconds = prometheus::CounterVec::new(
            Opts::new(
                "anteroom_preempted_backend_seconds_total",
                "Backend time of preempted attempts, thrown away, by the stopped request's priority.",
            ),
            p,
        )
        .expect("valid metric");
        let requests = counter(
            "anteroom_requests_total",
            "Requests answered, by the status sent (499: the client left first).",
            &["status"],
        );
        let outcomes = counter(
            "anteroom_request_outcomes_total",
            "Requests by how they ended: ok, rejected, error, truncated, cancelled.",
            &["outcome"],
        );
        let rejections = counter(
            "anteroom_request_rejections_total",
            "Requests anteroom refused, by reason (its error code).",
            &["reason"],
        );
        let waiting = gauge(
            "anteroom_num_requests_waiting",
            "Requests waiting in the queue.",
            p,
        );
        let running = gauge(
            "anteroom_num_requests_running",
            "Requests in flight at the upstream.",
            p,
        );
        let max_concurrency = IntGauge::new(
            "anteroom_max_concurrency",
            "The current limit of requests in flight at the upstream.",
        )
        .expect("metric definitions are valid");
        let max_queue = IntGauge::new(
            "anteroom_max_queue",
            "The most requests that may wait in the queue.",
        )
        .expect("metric definitions are valid");
        let backend_info = gauge(
            "anteroom_backend_info",
            "1 for each upstream, labelled with what its backend was identified as (kind: llama.cpp, vllm, ollama, lmstudio, openai, or unknown) and how the concurrency limit is decided (limit: fixed, backend, auto).",
            &["upstream", "kind", "limit"],
        );
        let backend_slots = gauge(
            "anteroom_backend_slots",
            "Slots the backend reports it serves at once (llama.cpp's total_slots); absent where it reports none.",
            &["upstream"],
        );
        let backend_running = gauge(
            "anteroom_backend_requests_running",
            "Requests the backend reports it is processing (all its clients', not only anteroom's).",
            &["upstream"],
        );
        let backend_waiting = gauge(
            "anteroom_backend_requests_waiting",
            "Requests the backend reports waiting inside it for a slot: above 0, the queue has moved into the backend.",
            &["upstream"],
        );
        let reserved_used = gauge(
            "anteroom_reserved_slots_used",
            "Running requests that may use a reservation (at its max_priority or more urgent).",
            &["max_priority"],
        );
        let reserved_free = gauge(
            "anteroom_reserved_slots_free",
            "More requests at a reservation's max_priority that could start now.",
            &["max_priority"],
        );
        let log_dropped = IntCounter::new(
            "anteroom_request_log_dropped_total",
            "Request records lost because the request log's writer could not keep up.",
        )
        .expect("metric definitions are valid");
        let log_written = IntCounter::new(
            "anteroom_request_log_written_total",
            "Request records written to the request log.",
        )
        .expect("metric definitions are valid");

        let upstream_retries = counter(
            "anteroom_upstream_retries_total",
            "Requests sent again after the upstream refused them, by reason.",
            &["reason"],
        );
        let given_up = counter(
            "anteroom_upstream_retries_given_up_total",
            "Refused requests not retried again, by why: max_retries, too_long (advised wait over retry_max_delay), budget, upstream_said_no (x-should-retry: false).",
            &["why"],
        );
        let upstream_pauses = IntCounter::new(
            "anteroom_upstream_pauses_total",
            "Times an upstream 429/503 paused dispatch to the upstream for every request.",
        )
        .expect("metric definitions are valid");
        let client_retries = IntCounter::new(
            "anteroom_client_retries_total",
            "Requests that were a client's own retry (x-stainless-retry-count above 0).",
        )
        .expect("metric definitions are valid");
        let queue_keepalives = IntCounter::new(
            "anteroom_queue_keepalive_streams_total",
            "Streams that asked for keep-alive comments and waited queue_keepalive in the queue: answered 200 early, kept alive with SSE comments, any error sent as an error event.",
        )
        .expect("metric definitions are valid");

        let tenant_requests = counter(
            "anteroom_tenant_requests_total",
            "Requests by API key name (configured names only) and outcome.",
            &["tenant", "outcome"],
        );
        let tenant_tokens = counter(
            "anteroom_tenant_generation_tokens_total",
            "Generated tokens of finished requests by API key name.",
            &["tenant"],
        );
        let registry = Registry::new();
        let mut names = Vec::new();
        for c in [
            Box::new(queue.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(ttft.clone()),
            Box::new(backend_ttft.clone()),
            Box::new(backend_wait.clone()),
            Box::new(itl.clone()),
            Box::new(tpot.clone()),
            Box::new(e2e.clone()),
            Box::new(prompt_tokens.clone()),
            Box::new(generation_tokens.clone()),
            Box::new(preemptions.clone()),
            Box::new(preempted_seconds.clone()),
            Box::new(requests.clone()),
            Box::new(outcomes.clone()),
            Box::new(rejections.clone()),
            Box::new(waiting.clone()),
            Box::new(running.clone()),
            Box::new(max_concurrency.clone()),
            Box::new(max_queue.clone()),
            Box::new(backend_info.clone()),
            Box::new(backend_slots.clone()),
            Box::new(backend_running.clone()),
            Box::new(backend_waiting.clone()),
            Box::new(reserved_used.clone()),
            Box::new(reserved_free.clone()),
            Box::new(log_dropped.clone()),
            Box::new(log_written.clone()),
            Box::new(upstream_retries.clone()),
            Box::new(given_up.clone()),
            Box::new(upstream_pauses.clone()),
            Box::new(client_retries.clone()),
            Box::new(queue_keepalives.clone()),
            Box::new(tenant_requests.clone()),
            Box::new(tenant_tokens.clone()),
        ] {
            names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            registry.register(c).expect("metric names are unique");
        }
        let by_outcome = [
            Outcome::Ok,
            Outcome::Rejected,
            Outcome::Error,
            Outcome::Truncated,
            Outcome::Cancelled,
        ]
        .map(|o| outcomes.with_label_values(&[o.as_str()]));
        Self {
            registry,
            queue,
            ttft,
            backend_ttft,
            backend_wait,
            itl,
            tpot,
            e2e,
            prompt_tokens,
            generation_tokens,
            preemptions,
            preempted_seconds,
            requests,
            rejections,
            waiting,
            running,
            max_concurrency,
            max_queue,
            backend_info,
            backend_slots,
            backend_running,
            backend_waiting,
            reserved_used,
            reserved_free,
            log_dropped,
            log_written,
            by_priority: std::array::from_fn(|_| OnceLock::new()),
            by_status: (0..600).map(|_| OnceLock::new()).collect(),
            by_outcome,
            names,
            upstream_pauses,
            client_retries,
            queue_keepalives,
            retries: [
                crate::types::RetryReason::TooManyRequests,
                crate::types::RetryReason::Unavailable,
                crate::types::RetryReason::Connection,
                crate::types::RetryReason::Advised,
            ]
            .map(|r| upstream_retries.with_label_values(&[r.as_str()])),
            given_up,
            tenant_requests,
            tenant_tokens,
        }
    }

    /// Count a retry.
    pub fn retry(&self, reason: crate::types::RetryReason) {
        self.retries[reason as usize].inc();
    }

    /// Count a refused request that was not retried again.
    pub(crate) fn retries_given_up(&self, why: &str) {
        self.given_up.with_label_values(&[why]).inc();
    }

    fn priority(&self, p: Priority) -> &ByPriority {
        self.by_priority[class_of(p)].get_or_init(|| {
            let l = [priority_label(p)];
            let l = [l[0].as_str()];
            ByPriority {
                queue: self.queue.with_label_values(&l),
                ttft: self.ttft.with_label_values(&l),
                backend_ttft: self.backend_ttft.with_label_values(&l),
                backend_wait: self.backend_wait.with_label_values(&l),
                itl: self.itl.with_label_values(&l),
                tpot: self.tpot.with_label_values(&l),
                e2e: self.e2e.with_label_values(&l),
                prompt_tokens: self.prompt_tokens.with_label_values(&l),
                generation_tokens: self.generation_tokens.with_label_values(&l),
            }
        })
    }

    /// Count a finished request. `gaps_us` are its inter-token gaps.
    pub fn observe(&self, r: &Finished, gaps_us: &[u32]) {
        let status = usize::from(r.status).min(599);
        self.by_status[status]
            .get_or_init(|| self.requests.with_label_values(&[&status.to_string()]))
            .inc();
        self.by_outcome[r.outcome as usize].inc();
        // Tenants are configured key names: a bounded label set.
        if let Some(tenant) = r.tap.tenant() {
            self.tenant_requests
                .with_label_values(&[&**tenant, r.outcome.as_str()])
                .inc();
            if let (Outcome::Ok, Some(n)) = (r.outcome, r.timings.completion_tokens) {
                self.tenant_tokens.with_label_values(&[&**tenant]).inc_by(n);
            }
        }
        if r.outcome == Outcome::Rejected {
            if let Some(code) = r.error {
                self.rejections.with_label_values(&[code]).inc();
            }
        }
        // Latency and tokens only for admitted (generation) requests: a
        // GET /v1/models is not a model latency.
        let Some(p) = r.priority else { return };
        let m = self.priority(p);
        let t = &r.timings;
        if t.preemptions > 0 {
            let l = [priority_label(p)];
            let l = [l[0].as_str()];
            self.preemptions
                .with_label_values(&l)
                .inc_by(u64::from(t.preemptions));
            self.preempted_seconds
                .with_label_values(&l)
                .inc_by(t.preempted_ms / 1000.0);
        }
        let secs = |ms: Option<f64>| ms.map(|v| v / 1000.0);
        if let Some(v) = secs(t.queue_ms) {
            m.queue.observe(v);
        }
        if r.outcome != Outcome::Ok {
            return;
        }
        for (h, v) in [
            (&m.ttft, t.ttft_ms),
            (&m.backend_ttft, t.backend_ttft_ms),
            (&m.backend_wait, t.backend_wait_ms),
            (&m.tpot, t.tpot_ms),
            (&m.e2e, t.e2e_ms),
        ] {
            if let Some(v) = secs(v) {
                h.observe(v);
            }
        }
        for &g in gaps_us {
            m.itl.observe(f64::from(g) / 1e6);
        }
        if let Some(n) = t.prompt_tokens {
            m.prompt_tokens.inc_by(n);
        }
        if let Some(n) = t.completion_tokens {
            m.generation_tokens.inc_by(n);
        }
    }

    /// The text exposition, with the queue gauges taken from `snapshot`
    /// and the backend gauges from each upstream's backend.
    pub fn encode(
        &self,
        snapshot: &QueueStatus,
        backends: &[(&str, &crate::types::BackendStatus)],
    ) -> String {
        for g in [
            &self.backend_info,
            &self.backend_slots,
            &self.backend_running,
            &self.backend_waiting,
        ] {
            g.reset();
        }
        for (name, b) in backends {
            self.backend_info
                .with_label_values(&[
                    name,
                    b.kind.unwrap_or("unknown"),
                    b.limit.split(' ').next().unwrap_or("auto"),
                ])
                .set(1);
            for (g, v) in [
                (&self.backend_slots, b.slots),
                (&self.backend_running, b.running),
                (&self.backend_waiting, b.waiting),
            ] {
                if let Some(v) = v {
                    g.with_label_values(&[name]).set(v as i64);
                }
            }
        }
        self.max_concurrency.set(snapshot.max_concurrency as i64);
        self.max_queue.set(snapshot.max_queue as i64);
        for (vec, by) in [
            (&self.waiting, &snapshot.waiting_by_priority),
            (&self.running, &snapshot.running_by_priority),
        ] {
            vec.reset();
            // Always show the default class, so the series exist at zero.
            vec.with_label_values(&["0"]).set(0);
            for (&p, &n) in by {
                vec.with_label_values(&[&priority_label(p)]).add(n as i64);
            }
        }
        self.reserved_used.reset();
        self.reserved_free.reset();
        for r in &snapshot.reservations {
            let l = [r.max_priority.to_string()];
            let l = [l[0].as_str()];
            self.reserved_used.with_label_values(&l).add(r.used as i64);
            self.reserved_free.with_label_values(&l).add(r.free as i64);
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Names of every metric family exported, whether or not it has a
    /// sample yet (for checking dashboards against).
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_labels_are_bounded() {
        assert_eq!(priority_label(0), "0");
        assert_eq!(priority_label(-20), "-20");
        assert_eq!(priority_label(-21), "<-20");
        assert_eq!(priority_label(i32::MIN), "<-20");
        assert_eq!(priority_label(i32::MAX), ">20");
        let classes: std::collections::BTreeSet<usize> = [i32::MIN, -21, -20, 0, 20, 21, i32::MAX]
            .iter()
            .map(|&p| class_of(p))
            .collect();
        assert_eq!(classes.len(), 5);
        assert!(classes.iter().all(|&c| c < CLASSES));
        assert_eq!(class_of(i32::MIN), class_of(-1000));
    }
}
