//! Preemption and lent reservations, on tokio's paused clock: the
//! scheduler alone, then the admission layer in front of a scripted
//! service.

use std::convert::Infallible;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use parking_lot::Mutex;
use tower::{Service, ServiceBuilder, ServiceExt};

use super::*;
use crate::config::{Limits, Preemption, Reservation};
use crate::types::{Admit, Share};

fn limits(max_concurrency: usize, preempt: Option<Preemption>) -> Limits {
    Limits {
        max_concurrency,
        max_queue: 100,
        queue_timeout: Duration::from_secs(30),
        retry_after_cap: Duration::from_secs(60),
        reserved: vec![],
        promote_after: None,
        preempt,
    }
}

const ON: Option<Preemption> = Some(Preemption {
    max_priority: 0,
    max_preemptions: 2,
});

/// A non-streamed request whose body is held whole.
const JSON: Option<Replayable> = Some(Replayable {
    preemptions: 0,
    stream: false,
});

fn admitted(a: Acquire) -> Permit {
    match a {
        Acquire::Admitted(p) => p,
        Acquire::Queued(_) => panic!("queued, expected admitted"),
        Acquire::Rejected(e) => panic!("rejected: {e}"),
    }
}

fn queued(a: Acquire) -> Ticket {
    match a {
        Acquire::Queued(t) => t,
        Acquire::Admitted(_) => panic!("admitted, expected queued"),
        Acquire::Rejected(e) => panic!("rejected: {e}"),
    }
}

/// Its new place, if the permit was preempted.
async fn preempted(permit: &mut Permit) -> Option<Ticket> {
    poll_fn(|cx| match permit.poll_preempted(cx) {
        Poll::Ready(p) => Poll::Ready(Some(p.ticket)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

fn share() -> Share {
    Share::default()
}

#[tokio::test(start_paused = true)]
async fn an_urgent_arrival_takes_the_slot_of_a_batch_request_that_has_not_answered() {
    let s = Scheduler::new(limits(1, ON));
    let mut batch = admitted(s.acquire_as(10, &share(), || JSON));
    tokio::time::advance(Duration::from_secs(3)).await;
    let urgent = admitted(s.acquire_as(0, &share(), || None));
    let snap = s.snapshot();
    assert_eq!((snap.running, snap.waiting), (1, 1));
    assert_eq!(snap.running_by_priority.get(&0), Some(&1));
    let counts = snap.preempted.expect("shown with preemption on")[&10];
    assert_eq!(counts.preemptions, 1);
    assert_eq!(counts.wasted_seconds, 3.0);
    let mut place = preempted(&mut batch).await.expect("preempted");
    // Its permit frees nothing now: the slot is the urgent request's.
    drop(batch);
    assert_eq!(s.snapshot().running, 1);
    assert!(place.try_take().is_none());
    drop(urgent);
    let again = place.try_take().expect("the freed slot is its").unwrap();
    assert_eq!(again.preemptions(), 1);
    assert_eq!(s.snapshot().running, 1);
}

#[tokio::test(start_paused = true)]
async fn nothing_is_preempted_without_preemption_or_by_the_not_urgent() {
    for (preempt, urgent_priority, victim) in [
        (None, 0, JSON),
        // Only priorities at preempt_max_priority or more urgent preempt.
        (ON, 1, JSON),
        // Only a strictly less urgent request is preempted.
        (
            Some(Preemption {
                max_priority: 10,
                max_preemptions: 2,
            }),
            10,
            JSON,
        ),
        // A request whose body cannot be sent again is never preempted.
        (ON, 0, None),
    ] {
        let s = Scheduler::new(limits(1, preempt));
        let mut batch = admitted(s.acquire_as(10, &share(), || victim));
        let _urgent = queued(s.acquire_as(urgent_priority, &share(), || None));
        assert!(preempted(&mut batch).await.is_none());
        assert_eq!(s.snapshot().running_by_priority.get(&10), Some(&1));
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_that_answered_is_not_preempted() {
    let s = Scheduler::new(limits(1, ON));
    let mut stream = admitted(s.acquire_as(10, &share(), || JSON));
    assert!(stream.answered().is_none(), "nobody preempted it yet");
    assert!(!stream.is_preemptible());
    let _urgent = queued(s.acquire_as(0, &share(), || None));
    assert!(preempted(&mut stream).await.is_none());
    assert_eq!(s.snapshot().running_by_priority.get(&10), Some(&1));
}

#[tokio::test(start_paused = true)]
async fn an_answer_that_comes_after_the_preemption_is_thrown_away() {
    let s = Scheduler::new(limits(1, ON));
    let mut batch = admitted(s.acquire_as(10, &share(), || JSON));
    let _urgent = admitted(s.acquire_as(0, &share(), || None));
    // The answer arrives before the victim noticed: it must go again.
    assert!(batch.answered().is_some());
}

#[tokio::test(start_paused = true)]
async fn the_victim_is_the_least_urgent_and_of_those_the_latest_started() {
    let s = Scheduler::new(limits(3, ON));
    let mut old10 = admitted(s.acquire_as(10, &share(), || JSON));
    tokio::time::advance(Duration::from_secs(1)).await;
    let mut new10 = admitted(s.acquire_as(10, &share(), || JSON));
    let mut five = admitted(s.acquire_as(5, &share(), || JSON));
    let _u1 = admitted(s.acquire_as(0, &share(), || None));
    assert!(preempted(&mut new10).await.is_some(), "least work lost");
    assert!(preempted(&mut old10).await.is_none());
    let _u2 = admitted(s.acquire_as(0, &share(), || None));
    assert!(preempted(&mut old10).await.is_some());
    let _u3 = admitted(s.acquire_as(0, &share(), || None));
    assert!(preempted(&mut five).await.is_some());
    assert!(matches!(
        s.acquire_as(0, &share(), || None),
        Acquire::Queued(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_request_is_preempted_at_most_max_preemptions_times() {
    let s = Scheduler::new(limits(1, ON));
    let mut batch = admitted(s.acquire_as(10, &share(), || JSON));
    for round in 1..=2 {
        let urgent = admitted(s.acquire_as(0, &share(), || None));
        let mut place = preempted(&mut batch).await.expect("preempted");
        drop(urgent);
        batch = place.try_take().expect("its turn").unwrap();
        assert_eq!(batch.preemptions(), round);
        assert_eq!(batch.is_preemptible(), round < 2, "twice is the most");
    }
    let _urgent = queued(s.acquire_as(0, &share(), || None));
    assert!(preempted(&mut batch).await.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_victim_keeps_its_place_ahead_of_later_arrivals_of_its_priority() {
    let s = Scheduler::new(limits(1, ON));
    let mut batch = admitted(s.acquire_as(10, &share(), || JSON));
    let mut later = queued(s.acquire_as(10, &share(), || JSON));
    let urgent = admitted(s.acquire_as(0, &share(), || None));
    let mut place = preempted(&mut batch).await.expect("preempted");
    drop(urgent);
    let _running = place.try_take().expect("it goes first").unwrap();
    assert!(later.try_take().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_victim_whose_client_left_frees_nothing_twice() {
    let s = Scheduler::new(limits(1, ON));
    let batch = admitted(s.acquire_as(10, &share(), || JSON));
    let urgent = admitted(s.acquire_as(0, &share(), || None));
    // It never noticed: its permit (and with it the new place) goes.
    drop(batch);
    let snap = s.snapshot();
    assert_eq!((snap.running, snap.waiting), (1, 0));
    drop(urgent);
    let snap = s.snapshot();
    assert_eq!((snap.running, snap.waiting), (0, 0));
    assert!(snap.tenants.is_empty());
}

#[tokio::test(start_paused = true)]
async fn turning_preemption_off_by_reload_leaves_running_requests_be() {
    let s = Scheduler::new(limits(1, ON));
    let mut batch = admitted(s.acquire_as(10, &share(), || JSON));
    s.reconfigure(&limits(1, None), false);
    assert!(preempted(&mut batch).await.is_none());
    assert!(!batch.is_preemptible());
    let mut urgent = queued(s.acquire_as(0, &share(), || None));
    // And on again, with more room: new starts are candidates.
    s.reconfigure(&limits(3, ON), false);
    let _urgent = urgent.try_take().expect("a slot freed").unwrap();
    let batch2 = admitted(s.acquire_as(10, &share(), || JSON));
    assert!(batch2.is_preemptible());
    assert!(!batch.is_preemptible());
}

fn lending(preempt: Option<Preemption>) -> Arc<Scheduler> {
    Scheduler::new(Limits {
        reserved: vec![Reservation {
            max_priority: 0,
            slots: 1,
        }],
        ..limits(2, preempt)
    })
}

#[tokio::test(start_paused = true)]
async fn an_idle_reserved_slot_is_lent_to_batch_work_and_taken_back_at_once() {
    let s = lending(ON);
    let mut running: Vec<Permit> = (0..2)
        .map(|_| admitted(s.acquire_as(10, &share(), || JSON)))
        .collect();
    let mut waiting: Vec<Ticket> = (0..8)
        .map(|_| queued(s.acquire_as(10, &share(), || JSON)))
        .collect();
    assert_eq!(s.snapshot().running, 2, "both slots work for the flood");
    let urgent = admitted(s.acquire_as(0, &share(), || None));
    let mut victim = None;
    for p in &mut running {
        if let Some(t) = preempted(p).await {
            victim = Some(t);
        }
    }
    assert!(victim.is_some(), "one batch request gave its slot back");
    assert_eq!(s.snapshot().running, 2);
    // Borrowed again once the urgent one is done.
    drop(urgent);
    let mut victim = victim.expect("checked");
    let _again = victim.try_take().expect("first of its priority").unwrap();
    assert!(waiting[0].try_take().is_none());
}

#[tokio::test(start_paused = true)]
async fn reserved_slots_are_not_lent_without_preemption_nor_to_streams() {
    let stream = Some(Replayable {
        preemptions: 0,
        stream: true,
    });
    for (preempt, replay) in [(None, JSON), (ON, stream), (ON, None)] {
        let s = lending(preempt);
        let _one = admitted(s.acquire_as(10, &share(), || replay));
        let _two = queued(s.acquire_as(10, &share(), || replay));
        assert_eq!(s.snapshot().running, 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_reservation_not_every_priority_of_which_may_preempt_is_not_lent() {
    let s = Scheduler::new(Limits {
        reserved: vec![Reservation {
            max_priority: 5,
            slots: 1,
        }],
        ..limits(2, ON)
    });
    let _one = admitted(s.acquire_as(10, &share(), || JSON));
    let _two = queued(s.acquire_as(10, &share(), || JSON));
}

/// A scripted upstream: answers `urgent` at once and holds `batch` for a
/// minute; logs `start`, `done` and `drop` (the call was dropped unfinished)
/// of each call, with its body.
#[derive(Clone)]
struct Script(Arc<Mutex<Vec<String>>>);

struct Logged {
    log: Arc<Mutex<Vec<String>>>,
    body: String,
    done: bool,
}

impl Drop for Logged {
    fn drop(&mut self) {
        if !self.done {
            self.log.lock().push(format!("drop {}", self.body));
        }
    }
}

impl Service<Request<String>> for Script {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, r: Request<String>) -> Self::Future {
        let body = r.body().clone();
        self.0.lock().push(format!("start {body}"));
        let mut logged = Logged {
            log: self.0.clone(),
            body,
            done: false,
        };
        Box::pin(async move {
            if logged.body.starts_with("batch") {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            logged.done = true;
            logged.log.lock().push(format!("done {}", logged.body));
            Ok(Response::new(Full::new(Bytes::from(logged.body.clone()))))
        })
    }
}

/// Admission through `s` in front of a [`Script`], and the script's log.
fn scripted(s: &Arc<Scheduler>) -> (Arc<Mutex<Vec<String>>>, Admission<Script>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let svc = ServiceBuilder::new()
        .layer(AdmissionLayer::new(crate::route::one_row(s.clone())))
        .service(Script(log.clone()));
    (log, svc)
}

fn req(priority: i32, body: &str) -> Request<String> {
    let mut r = Request::new(body.to_string());
    r.extensions_mut().insert(Admit::new(priority));
    r
}

#[tokio::test(start_paused = true)]
async fn a_preempted_request_is_stopped_requeued_and_sent_again_unseen_by_its_client() {
    use http_body_util::BodyExt;
    let s = Scheduler::new(limits(1, ON));
    let (log, svc) = scripted(&s);
    let batch = tokio::spawn(svc.clone().oneshot(req(10, "batch-1")));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let urgent = svc.clone().oneshot(req(0, "urgent")).await.unwrap();
    let body = urgent.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"urgent");
    let batch = batch.await.unwrap().unwrap();
    let body = batch.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"batch-1", "one answer, of its own body");
    assert_eq!(
        *log.lock(),
        [
            "start batch-1",
            "drop batch-1",
            "start urgent",
            "done urgent",
            "start batch-1",
            "done batch-1"
        ]
    );
    let snap = s.snapshot();
    assert_eq!((snap.running, snap.waiting, snap.completed), (0, 0, 2));
}

#[tokio::test(start_paused = true)]
async fn a_steady_stream_of_urgent_work_does_not_livelock_a_victim() {
    use http_body_util::BodyExt;
    let s = Scheduler::new(Limits {
        queue_timeout: Duration::from_secs(600),
        ..limits(1, ON)
    });
    let (log, svc) = scripted(&s);
    let batch = {
        let svc = svc.clone();
        tokio::spawn(async move {
            let r = svc.oneshot(req(10, "batch-1")).await.unwrap();
            r.into_body().collect().await.unwrap().to_bytes()
        })
    };
    // An urgent request every 10 s, each taking no time, for five minutes:
    // the batch request is preempted twice, then runs its minute out.
    let mut urgent = Vec::new();
    for i in 0..30 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let svc = svc.clone();
        urgent.push(tokio::spawn(async move {
            let r = svc.oneshot(req(0, &format!("urgent-{i}"))).await.unwrap();
            r.into_body().collect().await.unwrap();
        }));
    }
    for u in urgent {
        u.await.unwrap();
    }
    assert_eq!(&batch.await.unwrap()[..], b"batch-1");
    let log = log.lock();
    let drops = log.iter().filter(|e| *e == "drop batch-1").count();
    assert_eq!(drops, 2, "{log:?}");
    assert_eq!(log.iter().filter(|e| *e == "done batch-1").count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_victim_whose_client_leaves_while_it_waits_again_leaves_at_once() {
    let s = Scheduler::new(limits(1, ON));
    let (log, svc) = scripted(&s);
    let batch = tokio::spawn(svc.clone().oneshot(req(10, "batch-1")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let urgent = svc.clone().oneshot(req(0, "urgent")).await.unwrap();
    tokio::task::yield_now().await;
    assert_eq!(s.snapshot().waiting, 1, "the victim waits again");
    batch.abort();
    let _ = batch.await;
    assert_eq!(s.snapshot().waiting, 0);
    drop(urgent);
    let snap = s.snapshot();
    assert_eq!((snap.running, snap.waiting), (0, 0));
    assert_eq!(
        log.lock()
            .iter()
            .filter(|e| e.starts_with("start batch"))
            .count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_victims_queue_time_left_still_bounds_its_waits() {
    let s = Scheduler::new(Limits {
        queue_timeout: Duration::from_secs(10),
        ..limits(1, ON)
    });
    let (_log, svc) = scripted(&s);
    // A long urgent request holds the slot; batch waits 4 s, runs, is
    // preempted by a second urgent one that runs a minute: batch has 6 s
    // of queue time left, then is told to come back.
    let first = svc.clone().oneshot(req(0, "urgent-1")).await.unwrap();
    let batch = tokio::spawn(svc.clone().oneshot(req(10, "batch-1")));
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(first);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let hold = svc.clone().oneshot(req(0, "urgent-2")).await.unwrap();
    let started = tokio::time::Instant::now();
    let err = batch.await.unwrap().expect_err("timed out");
    assert_eq!(started.elapsed(), Duration::from_secs(6));
    let e = crate::error::describe(&*err);
    assert_eq!(e.code, "queue_timeout");
    drop(hold);
}
