//! The retry loop against a scripted upstream, on tokio's paused clock.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Empty, Full};
use parking_lot::Mutex;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::*;
use crate::error::{UpstreamTimeout, UpstreamUnavailable};
use crate::types::Admit;

/// What the scripted upstream does on each call, in order; the last entry
/// repeats.
#[derive(Clone)]
enum Step {
    Status(u16, Option<&'static str>),
    /// A status with `x-should-retry`.
    Said(u16, bool),
    Unreachable,
    TimedOut,
}

#[derive(Clone)]
struct Upstream {
    script: Arc<Mutex<VecDeque<Step>>>,
    calls: Arc<Mutex<Vec<Instant>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// What the upstream saw of one call: its route, whether the client's
/// address came along, and its x-request-id.
type Seen = (Option<Route>, bool, Option<String>);

type TestReq = Request<Either<Full<Bytes>, Empty<Bytes>>>;

impl Upstream {
    fn new(steps: &[Step]) -> Self {
        Self {
            script: Arc::new(Mutex::new(steps.iter().cloned().collect())),
            calls: Arc::new(Mutex::new(Vec::new())),
            seen: Arc::default(),
        }
    }

    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().clone()
    }
}

impl Service<TestReq> for Upstream {
    type Response = Response<&'static str>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<&'static str>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: TestReq) -> Self::Future {
        self.calls.lock().push(Instant::now());
        self.seen.lock().push((
            req.extensions().get::<Route>().copied(),
            req.extensions().get::<ClientAddr>().is_some(),
            req.headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ));
        let step = {
            let mut s = self.script.lock();
            if s.len() > 1 {
                s.pop_front().expect("not empty")
            } else {
                s.front().cloned().expect("a script")
            }
        };
        std::future::ready(match step {
            Step::Status(code, advice) => {
                let mut b = Response::builder().status(code);
                if let Some(ms) = advice {
                    b = b.header("retry-after-ms", ms);
                }
                Ok(b.body("answer").expect("valid"))
            }
            Step::Said(code, retry) => Ok(Response::builder()
                .status(code)
                .header("x-should-retry", if retry { "true" } else { "false" })
                .body("answer")
                .expect("valid")),
            Step::Unreachable => Err(UpstreamUnavailable::new("connection refused").into()),
            Step::TimedOut => Err(UpstreamTimeout::new(Duration::from_secs(1)).into()),
        })
    }
}

fn policy(max_retries: u32) -> RetryPolicy {
    RetryPolicy {
        max_retries,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(30),
        budget: 0.2,
    }
}

fn stack(p: RetryPolicy, up: &Upstream) -> Backoff<Upstream> {
    let recorder = Recorder::new(None).expect("no log to open");
    // Back-off never asks the scheduler for a slot: any will do.
    let scheduler = crate::admission::Scheduler::new(crate::config::Limits {
        max_concurrency: 1,
        max_queue: 1,
        queue_timeout: Duration::from_secs(30),
        retry_after_cap: Duration::from_secs(60),
        reserved: vec![],
        promote_after: None,
        preempt: None,
    });
    BackoffLayer::new(p, recorder, crate::route::one_row(scheduler)).layer(up.clone())
}

fn req(admitted: bool) -> TestReq {
    let mut r = Request::new(Either::Left(Full::new(Bytes::from_static(b"{}"))));
    if admitted {
        r.extensions_mut().insert(Admit::new(0));
    }
    r
}

#[tokio::test(start_paused = true)]
async fn a_429_is_retried_after_the_advised_delay_and_the_client_never_sees_it() {
    let up = Upstream::new(&[Step::Status(429, Some("2000")), Step::Status(200, None)]);
    let start = Instant::now();
    let resp = stack(policy(3), &up).oneshot(req(true)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let calls = up.calls();
    assert_eq!(calls.len(), 2);
    assert!(
        calls[1] - start >= Duration::from_secs(2),
        "{:?}",
        calls[1] - start
    );
}

#[tokio::test(start_paused = true)]
async fn giving_up_passes_the_refusal_on_with_retry_advice() {
    let up = Upstream::new(&[Step::Status(503, None)]);
    let resp = stack(policy(2), &up).oneshot(req(true)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(up.calls().len(), 3, "the first try and two retries");
    let secs: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(secs >= 1);
    assert!(resp.headers().contains_key("retry-after-ms"));
}

#[tokio::test(start_paused = true)]
async fn a_429_marked_not_to_be_retried_passes_on_at_once_and_pauses_nobody() {
    let up = Upstream::new(&[Step::Said(429, false), Step::Status(200, None)]);
    let svc = stack(policy(3), &up);
    let start = Instant::now();
    let resp = svc.clone().oneshot(req(true)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    assert!(
        !resp.headers().contains_key("retry-after"),
        "passed on untouched"
    );
    // The next request goes straight to the upstream: no pause.
    let resp = svc.oneshot(req(true)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(up.calls(), [start, start]);
}

#[tokio::test(start_paused = true)]
async fn a_5xx_is_retried_only_when_the_upstream_says_so() {
    let up = Upstream::new(&[Step::Said(500, true), Step::Status(200, None)]);
    let resp = stack(policy(3), &up).oneshot(req(true)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(up.calls().len(), 2);

    let up = Upstream::new(&[Step::Status(500, None), Step::Status(200, None)]);
    let resp = stack(policy(3), &up).oneshot(req(true)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(up.calls().len(), 1);

    // A 400 is the client's to fix, whatever the header says.
    let up = Upstream::new(&[Step::Said(400, true), Step::Status(200, None)]);
    let resp = stack(policy(3), &up).oneshot(req(true)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(up.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn advice_longer_than_retry_max_delay_goes_to_the_client() {
    let up = Upstream::new(&[Step::Status(429, Some("120000")), Step::Status(200, None)]);
    let resp = stack(policy(3), &up).oneshot(req(true)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        resp.headers()["retry-after-ms"],
        "120000",
        "the upstream's own"
    );
    assert_eq!(up.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_budget_caps_retries_in_a_storm_of_refusals() {
    // A fixed 1 ms advice: with jittered delays the storm's (paused) time
    // depended on the random draws, and could outlast the budget's
    // ten-second window and so earn more retries.
    let up = Upstream::new(&[Step::Status(429, Some("1"))]);
    let svc = stack(policy(3), &up);
    const N: usize = 100;
    for _ in 0..N {
        let resp = svc.clone().oneshot(req(true)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    let retries = up.calls().len() - N;
    // 20% of 100 requests plus the reserve: far below the 300 that
    // max_retries alone would allow.
    let cap = (N as f64 * 0.2) as usize + budget::RESERVE as usize;
    assert!(retries <= cap, "{retries} retries, cap {cap}");
    assert!(
        retries >= cap - 2,
        "{retries} retries: the budget was usable"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refusal_pauses_the_upstream_for_every_request() {
    let up = Upstream::new(&[Step::Status(429, Some("2000")), Step::Status(200, None)]);
    let svc = stack(policy(3), &up);
    let start = Instant::now();
    let a = tokio::spawn(svc.clone().oneshot(req(true)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // B arrives while the upstream is paused: it waits rather than
    // collecting a 429 of its own.
    let b = tokio::spawn(svc.clone().oneshot(req(true)));
    assert_eq!(a.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(b.await.unwrap().unwrap().status(), StatusCode::OK);
    let calls = up.calls();
    assert_eq!(calls.len(), 3, "A refused, then A and B once each");
    for c in &calls[1..] {
        assert!(*c - start >= Duration::from_secs(2), "{:?}", *c - start);
    }
}

#[tokio::test(start_paused = true)]
async fn refused_connections_are_retried_timeouts_are_not() {
    let up = Upstream::new(&[Step::Unreachable, Step::Status(200, None)]);
    let resp = stack(policy(3), &up).oneshot(req(true)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(up.calls().len(), 2);

    let up = Upstream::new(&[Step::TimedOut, Step::Status(200, None)]);
    let err = stack(policy(3), &up).oneshot(req(true)).await.unwrap_err();
    assert!(error::cause::<UpstreamTimeout>(&*err).is_some());
    assert_eq!(
        up.calls().len(),
        1,
        "the upstream may still be working on it"
    );
}

#[tokio::test(start_paused = true)]
async fn only_admitted_requests_are_retried() {
    let up = Upstream::new(&[Step::Status(429, Some("10")), Step::Status(200, None)]);
    let resp = stack(policy(3), &up).oneshot(req(false)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(up.calls().len(), 1);
}

#[test]
fn jitter_stays_under_its_ceiling_and_spreads() {
    let ceiling = Duration::from_millis(1000);
    let draws: Vec<Duration> = (0..1000).map(|_| jitter(ceiling)).collect();
    assert!(draws.iter().all(|d| *d <= ceiling));
    let below_half = draws.iter().filter(|d| **d < ceiling / 2).count();
    assert!(
        (350..650).contains(&below_half),
        "{below_half} of 1000 below half"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_carries_the_route_the_client_address_and_the_headers() {
    let up = Upstream::new(&[Step::Status(429, Some("10")), Step::Status(200, None)]);
    let mut r = req(true);
    r.extensions_mut().insert(Route(0));
    r.extensions_mut()
        .insert(ClientAddr::new("127.0.0.1:9".parse().expect("an address")));
    r.headers_mut()
        .insert("x-request-id", http::HeaderValue::from_static("r-1"));
    let resp = stack(policy(3), &up).oneshot(r).await.expect("answered");
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = up.seen.lock().clone();
    let want = (Some(Route(0)), true, Some("r-1".to_owned()));
    assert_eq!(seen, vec![want.clone(), want]);
}

#[tokio::test(start_paused = true)]
async fn absurd_advice_from_the_upstream_is_passed_on_not_a_panic() {
    // retry-after-ms: 1e30 used to panic in Duration::from_secs_f64 and cut
    // the client's connection. Longer than retry_max_delay: passed on.
    let up = Upstream::new(&[Step::Status(429, Some("1e30"))]);
    let resp = stack(policy(3), &up).oneshot(req(true)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(up.calls().len(), 1, "not retried");
    // The advice added for the client saturates rather than wraps.
    let secs: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(secs > 1 << 50, "{secs}");
}
