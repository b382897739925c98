//! A traced request's notes: its ids, and each time it was sent upstream.

use std::time::Duration;

use http::HeaderMap;

use super::context::{self, Parent};

/// The error of an attempt stopped because an urgent request took its slot.
pub(crate) const PREEMPTED: &str = "preempted";

/// What a request's spans are made of besides its record: its ids and its
/// attempts upstream. Only a request of a traced proxy has them.
#[derive(Debug)]
pub(crate) struct TraceNotes {
    pub(crate) trace_id: [u8; 16],
    /// anteroom's span for the request.
    pub(crate) span_id: [u8; 8],
    /// The client's span and trace state, when it sent a `traceparent`.
    pub(crate) parent: Option<Parent>,
    /// Its spans are recorded and exported.
    pub(crate) sampled: bool,
    /// Each time it was sent upstream (only when sampled).
    pub(crate) attempts: parking_lot::Mutex<Vec<Attempt>>,
    /// Where its attempts' span ids come from.
    pub(crate) ids: std::sync::Arc<Ids>,
}

/// One time a request was sent upstream: a child span of its own, and the
/// parent of what the backend records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Attempt {
    pub(crate) span_id: [u8; 8],
    /// After arrival.
    pub(crate) start: Duration,
    /// When its answer's headers came, it failed, or it was preempted;
    /// `None` while it waits for headers. The span of the answer the
    /// client got runs on to the request's end.
    pub(crate) end: Option<Duration>,
    /// The status of its answer's headers.
    pub(crate) status: Option<u16>,
    /// Why it got no answer, or was stopped.
    pub(crate) error: Option<&'static str>,
}

impl TraceNotes {
    /// The `traceparent` the upstream gets for an attempt starting `at`
    /// after arrival: the attempt's own span when sampled (so that the
    /// backend's spans nest under it); anteroom's unsampled span when the
    /// trace began here; and the client's own header, untouched, for a
    /// client's trace that is not sampled.
    pub(crate) fn to_upstream(&self, at: Duration, headers: &mut HeaderMap) {
        if self.sampled {
            let span_id = self.ids.span_id();
            self.attempts.lock().push(Attempt {
                span_id,
                start: at,
                end: None,
                status: None,
                error: None,
            });
            headers.insert(
                context::TRACEPARENT,
                context::traceparent(&self.trace_id, &span_id, true),
            );
        } else if self.parent.is_none() {
            headers.insert(
                context::TRACEPARENT,
                context::traceparent(&self.trace_id, &self.span_id, false),
            );
        }
    }

    /// The running attempt ended `at` after arrival: with an answer of
    /// `status`, or with no answer (`error`).
    pub(crate) fn attempt_ended(
        &self,
        at: Duration,
        status: Option<u16>,
        error: Option<&'static str>,
    ) {
        if !self.sampled {
            return;
        }
        if let Some(a) = self.attempts.lock().last_mut() {
            if a.end.is_none() {
                a.status = status;
                a.error = error;
                a.end = Some(at);
            }
        }
    }

    /// The running attempt's answer was taken back (an urgent request took
    /// its slot) `at` after arrival.
    pub(crate) fn preempted(&self, at: Duration) {
        if !self.sampled {
            return;
        }
        if let Some(a) = self.attempts.lock().last_mut() {
            if a.error.is_none() {
                a.end = Some(at);
                a.error = Some(PREEMPTED);
            }
        }
    }

    /// Its attempts so far.
    pub(crate) fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().clone()
    }
}

/// Trace and span ids: random (SplitMix64 over a seed from the clock and
/// the process id, and a counter), never zero. Not cryptographic; the
/// specification asks only that they be unique and spread out.
#[derive(Debug)]
pub(crate) struct Ids {
    seed: u64,
    next: std::sync::atomic::AtomicU64,
}

impl Ids {
    pub(crate) fn new() -> Self {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        Self {
            seed: crate::random::splitmix(clock ^ (u64::from(std::process::id()) << 32)),
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }

    fn word(&self) -> u64 {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match crate::random::splitmix(
            self.seed
                .wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        ) {
            0 => 1,
            w => w,
        }
    }

    pub(crate) fn span_id(&self) -> [u8; 8] {
        self.word().to_be_bytes()
    }

    pub(crate) fn trace_id(&self) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.word().to_be_bytes());
        id[8..].copy_from_slice(&self.word().to_be_bytes());
        id
    }
}

/// Which new traces are kept: OpenTelemetry's `TraceIdRatioBased`, the
/// decision a function of the trace id alone (its last 8 bytes), so every
/// service that samples by ratio agrees on a trace.
pub(crate) fn keeps(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    (u64::from_be_bytes(low) >> 1) < bound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_never_zero() {
        let ids = Ids::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let s = ids.span_id();
            assert_ne!(s, [0; 8]);
            assert!(seen.insert(s));
        }
        assert_ne!(ids.trace_id(), ids.trace_id());
    }

    #[test]
    fn the_ratio_keeps_its_share_of_traces() {
        let ids = Ids::new();
        let kept = (0..20_000).filter(|_| keeps(&ids.trace_id(), 0.1)).count();
        assert!((1_600..2_400).contains(&kept), "{kept} of 20,000 at 0.1");
        assert!((0..1_000).all(|_| keeps(&ids.trace_id(), 1.0)));
        assert!((0..1_000).all(|_| !keeps(&ids.trace_id(), 0.0)));
    }

    #[test]
    fn attempts_are_noted_with_their_ends() {
        let ids = std::sync::Arc::new(Ids::new());
        let notes = TraceNotes {
            trace_id: ids.trace_id(),
            span_id: ids.span_id(),
            parent: None,
            sampled: true,
            attempts: Default::default(),
            ids: ids.clone(),
        };
        let mut h = HeaderMap::new();
        let ms = Duration::from_millis;
        notes.to_upstream(ms(5), &mut h);
        notes.attempt_ended(ms(7), Some(429), None);
        notes.to_upstream(ms(20), &mut h);
        notes.attempt_ended(ms(22), None, Some("upstream_timeout"));
        notes.to_upstream(ms(40), &mut h);
        notes.attempt_ended(ms(45), Some(200), None);
        let a = notes.attempts();
        assert_eq!(a.len(), 3);
        assert_eq!((a[0].status, a[0].end), (Some(429), Some(ms(7))));
        assert_eq!(
            (a[1].error, a[1].end),
            (Some("upstream_timeout"), Some(ms(22)))
        );
        assert_eq!((a[2].status, a[2].end), (Some(200), Some(ms(45))));
        notes.preempted(ms(60));
        assert_eq!(notes.attempts()[2].end, Some(ms(60)));
        assert_eq!(notes.attempts()[2].error, Some("preempted"));
        // The upstream's parent is the last attempt's span.
        let sent = super::Parent::of(&h).expect("a traceparent");
        assert_eq!(sent.span_id, a[2].span_id);
        assert_eq!(sent.trace_id, notes.trace_id);
        assert!(sent.sampled);
    }
}
