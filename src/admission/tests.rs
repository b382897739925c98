//! Admission against in-process services, on tokio's paused clock.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

use super::*;
use crate::config::{Limits, Reservation};
use crate::error::describe;
use crate::types::{Admit, Reason, Share};

fn limits(max_concurrency: usize, max_queue: usize) -> Limits {
    Limits {
        max_concurrency,
        max_queue,
        queue_timeout: Duration::from_secs(30),
        retry_after_cap: Duration::from_secs(60),
        reserved: vec![],
        promote_after: None,
        preempt: None,
    }
}

fn req(priority: i32, tag: &str) -> Request<String> {
    let mut r = Request::new(tag.to_string());
    r.extensions_mut().insert(Admit::new(priority));
    r
}

/// A service that records the order requests reach it and answers at once.
#[derive(Clone)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Service<Request<String>> for Recorder {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, r: Request<String>) -> Self::Future {
        self.0.lock().push(r.body().clone());
        std::future::ready(Ok(Response::new(Empty::new())))
    }
}

fn recorder(log: Arc<Mutex<Vec<String>>>) -> Recorder {
    Recorder(log)
}

#[tokio::test(start_paused = true)]
async fn freed_slot_goes_to_the_most_urgent_then_earliest_waiter() {
    let scheduler = Scheduler::new(limits(1, 100));
    let log = Arc::new(Mutex::new(Vec::new()));
    let svc = ServiceBuilder::new()
        .layer(AdmissionLayer::new(crate::route::one_row(
            scheduler.clone(),
        )))
        .service(recorder(log.clone()));

    // The first request takes the slot and holds it through its body.
    let first = svc.clone().oneshot(req(0, "first")).await.unwrap();
    let order = [
        (5, "a5"),
        (1, "b1"),
        (3, "c3"),
        (1, "d1"),
        (-2, "e-2"),
        (5, "f5"),
    ];
    let mut waiting = Vec::new();
    for (p, tag) in order {
        let fut = svc.clone().oneshot(req(p, tag));
        let handle = tokio::spawn(async move {
            let resp = fut.await.unwrap();
            // Hold the slot a moment so the next dispatch is a separate step.
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(resp);
        });
        waiting.push(handle);
        tokio::task::yield_now().await;
    }
    assert_eq!(scheduler.snapshot().waiting, 6);
    drop(first);
    for h in waiting {
        h.await.unwrap();
    }
    assert_eq!(*log.lock(), ["first", "e-2", "b1", "d1", "c3", "a5", "f5"]);
    let snap = scheduler.snapshot();
    assert_eq!((snap.running, snap.waiting, snap.completed), (0, 0, 7));
}

#[tokio::test(start_paused = true)]
async fn the_permit_is_held_until_the_body_ends() {
    let scheduler = Scheduler::new(limits(1, 10));
    let svc = ServiceBuilder::new()
        .layer(AdmissionLayer::new(crate::route::one_row(
            scheduler.clone(),
        )))
        .service(service_fn(|_r: Request<String>| async {
            Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                Bytes::from_static(b"hi"),
            )))
        }));
    let resp = svc.clone().oneshot(req(0, "x")).await.unwrap();
    assert_eq!(
        scheduler.snapshot().running,
        1,
        "headers alone do not free the slot"
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hi");
    assert_eq!(
        scheduler.snapshot().running,
        0,
        "the end of the body frees it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_inner_call_returns_the_slot() {
    let scheduler = Scheduler::new(limits(1, 10));
    let svc = ServiceBuilder::new()
        .layer(AdmissionLayer::new(crate::route::one_row(
            scheduler.clone(),
        )))
        .service(service_fn(|_r: Request<String>| async {
            Err::<Response<Empty<Bytes>>, _>(std::io::Error::other("upstream down"))
        }));
    assert!(svc.clone().oneshot(req(0, "x")).await.is_err());
    assert_eq!(scheduler.snapshot().running, 0);
}

#[tokio::test(start_paused = true)]
async fn requests_without_admit_pass_straight_through() {
    let scheduler = Scheduler::new(limits(1, 0));
    let log = Arc::new(Mutex::new(Vec::new()));
    let svc = ServiceBuilder::new()
        .layer(AdmissionLayer::new(crate::route::one_row(
            scheduler.clone(),
        )))
        .service(recorder(log.clone()));
    let _busy = svc.clone().oneshot(req(0, "busy")).await.unwrap();
    // Queue off and the slot taken: an admitted request is refused ...
    assert!(svc.clone().oneshot(req(0, "refused")).await.is_err());
    // ... but a request without the Admit mark is not counted at all.
    let resp = svc
        .clone()
        .oneshot(Request::new("models".to_string()))
        .await;
    assert!(resp.is_ok());
    assert_eq!(*log.lock(), ["busy", "models"]);
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_answers_429_and_leaves_the_queue() {
    let scheduler = Scheduler::new(Limits {
        queue_timeout: Duration::from_secs(5),
        ..limits(1, 10)
    });
    let svc = ServiceBuilder::new()
        .layer(AdmissionLayer::new(crate::route::one_row(
            scheduler.clone(),
        )))
        .service(recorder(Arc::default()));
    let _busy = svc.clone().oneshot(req(0, "busy")).await.unwrap();
    let waiter = tokio::spawn(svc.clone().oneshot(req(0, "late")));
    tokio::time::sleep(Duration::from_millis(4_900)).await;
    assert_eq!(scheduler.snapshot().waiting, 1);
    let err = waiter.await.unwrap().unwrap_err();
    let d = describe(&*err);
    assert_eq!((d.status.as_u16(), d.code), (429, "queue_timeout"));
    assert_eq!(scheduler.snapshot().waiting, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_queued_request_frees_its_place_at_once() {
    let scheduler = Scheduler::new(limits(1, 10));
    let log = Arc::new(Mutex::new(Vec::new()));
    let svc = ServiceBuilder::new()
        .layer(AdmissionLayer::new(crate::route::one_row(
            scheduler.clone(),
        )))
        .service(recorder(log.clone()));
    let busy = svc.clone().oneshot(req(0, "busy")).await.unwrap();
    let gone = tokio::spawn(svc.clone().oneshot(req(0, "gone")));
    let next = tokio::spawn(svc.clone().oneshot(req(0, "next")));
    tokio::task::yield_now().await;
    assert_eq!(scheduler.snapshot().waiting, 2);
    gone.abort();
    let _ = gone.await;
    assert_eq!(
        scheduler.snapshot().waiting,
        1,
        "the client that left is out of the line"
    );
    drop(busy);
    next.await.unwrap().unwrap();
    assert_eq!(*log.lock(), ["busy", "next"]);
}

#[tokio::test(start_paused = true)]
async fn eviction_tells_the_displaced_waiter_with_a_429() {
    let scheduler = Scheduler::new(limits(1, 2));
    let svc = ServiceBuilder::new()
        .layer(AdmissionLayer::new(crate::route::one_row(
            scheduler.clone(),
        )))
        .service(recorder(Arc::default()));
    let busy = svc.clone().oneshot(req(0, "busy")).await.unwrap();
    let older = tokio::spawn(svc.clone().oneshot(req(5, "older")));
    tokio::task::yield_now().await;
    let newer = tokio::spawn(svc.clone().oneshot(req(5, "newer")));
    tokio::task::yield_now().await;
    let urgent = tokio::spawn(svc.clone().oneshot(req(0, "urgent")));
    let err = newer.await.unwrap().unwrap_err();
    assert_eq!(describe(&*err).code, "queue_full");
    assert_eq!(scheduler.snapshot().waiting, 2);
    drop(busy);
    drop(urgent.await.unwrap().unwrap());
    drop(older.await.unwrap().unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_permit_delivered_to_a_vanished_waiter_is_passed_on() {
    let scheduler = Scheduler::new(limits(1, 10));
    let Acquire::Admitted(first) = scheduler.acquire(0, &Share::default()) else {
        panic!("the slot is free")
    };
    let Acquire::Queued(ticket_a) = scheduler.acquire(0, &Share::default()) else {
        panic!("queued")
    };
    let Acquire::Queued(ticket_b) = scheduler.acquire(0, &Share::default()) else {
        panic!("queued")
    };
    // Release: the permit is sent to A, who has not polled yet.
    drop(first);
    assert_eq!(scheduler.snapshot().running, 1);
    // A goes away with the permit sitting in its channel: it goes to B.
    drop(ticket_a);
    let permit = ticket_b.wait().await.expect("B gets the slot");
    assert_eq!(scheduler.snapshot().running, 1);
    drop(permit);
    assert_eq!(scheduler.snapshot().running, 0);
}

#[tokio::test(start_paused = true)]
async fn raising_the_limit_dispatches_waiters() {
    let scheduler = Scheduler::new(limits(1, 10));
    let Acquire::Admitted(_first) = scheduler.acquire(0, &Share::default()) else {
        panic!()
    };
    let Acquire::Queued(ticket) = scheduler.acquire(0, &Share::default()) else {
        panic!()
    };
    scheduler.set_max_concurrency(2);
    let _second = ticket.wait().await.expect("dispatched by the raise");
    assert_eq!(scheduler.snapshot().running, 2);
}

/// The advised delay follows the measured drain rate: with a known service
/// time and queue length, it is within a factor of two of the true wait.
#[tokio::test(start_paused = true)]
async fn retry_after_tracks_the_true_wait() {
    for (service, slots, queued) in [(2_000u64, 1usize, 10usize), (500, 4, 40), (300, 2, 3)] {
        let service = Duration::from_millis(service);
        let scheduler = Scheduler::new(Limits {
            retry_after_cap: Duration::from_secs(3600),
            ..limits(slots, queued)
        });
        // Warm up: a few requests at the known service time.
        for _ in 0..20 {
            let Acquire::Admitted(p) = scheduler.acquire(0, &Share::default()) else {
                panic!()
            };
            tokio::time::advance(service).await;
            drop(p);
        }
        // Fill every slot, then the queue; each slot was taken at a
        // different moment of its service, as under steady load.
        let mut running = std::collections::VecDeque::new();
        for i in 0..slots {
            let Acquire::Admitted(p) = scheduler.acquire(0, &Share::default()) else {
                panic!()
            };
            running.push_back(p);
            if i + 1 < slots {
                tokio::time::advance(service / slots as u32).await;
            }
        }
        let mut tickets = std::collections::VecDeque::new();
        for _ in 0..queued {
            let Acquire::Queued(t) = scheduler.acquire(0, &Share::default()) else {
                panic!()
            };
            tickets.push_back(t);
        }
        let Acquire::Rejected(err) = scheduler.acquire(0, &Share::default()) else {
            panic!("the queue is full")
        };
        let advised = err.retry_after();
        // Now play it out: each running request ends `service` after it
        // started; count the time until the whole queue has been dispatched,
        // which is when the rejected request would have got its slot.
        let started = tokio::time::Instant::now();
        let mut live: std::collections::VecDeque<(tokio::time::Instant, Permit)> = running
            .drain(..)
            .map(|p| (p.started() + service, p))
            .collect();
        while !tickets.is_empty() {
            let (ends, p) = live.pop_front().unwrap();
            tokio::time::advance(ends.saturating_duration_since(tokio::time::Instant::now())).await;
            drop(p);
            let t = tickets.pop_front().unwrap();
            let p = t.wait().await.unwrap();
            live.push_back((tokio::time::Instant::now() + service, p));
        }
        let (ends, _) = live.front().unwrap();
        let true_wait = ends.saturating_duration_since(started);
        let ratio = advised.as_secs_f64() / true_wait.as_secs_f64();
        assert!(
            (0.5..=2.0).contains(&ratio),
            "service {service:?} slots {slots} queued {queued}: advised {advised:?}, true wait {true_wait:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_capped() {
    let scheduler = Scheduler::new(Limits {
        retry_after_cap: Duration::from_secs(60),
        ..limits(1, 1000)
    });
    let Acquire::Admitted(p) = scheduler.acquire(0, &Share::default()) else {
        panic!()
    };
    tokio::time::advance(Duration::from_secs(30)).await;
    drop(p);
    assert_eq!(scheduler.advise(500), Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn a_grant_racing_the_deadline_is_not_lost() {
    // The deadline fires at the moment the slot is handed over: the request
    // must run, not be told to go away while its slot leaks.
    let scheduler = Scheduler::new(Limits {
        queue_timeout: Duration::from_secs(1),
        ..limits(1, 10)
    });
    let (tx, rx) = oneshot::channel::<()>();
    let svc = ServiceBuilder::new()
        .layer(AdmissionLayer::new(crate::route::one_row(
            scheduler.clone(),
        )))
        .service(recorder(Arc::default()));
    let busy = svc.clone().oneshot(req(0, "busy")).await.unwrap();
    let waiter = tokio::spawn(svc.clone().oneshot(req(0, "w")));
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(busy);
        let _ = tx.send(());
    });
    let _ = rx.await;
    let outcome = waiter.await.unwrap();
    // Either outcome is fine, as long as the books balance afterwards.
    drop(outcome);
    let snap = scheduler.snapshot();
    assert_eq!((snap.running, snap.waiting), (0, 0));
}

/// Before anything completed, the advice is short and grows with the age of
/// what runs (a running request is taken to run as long again as it has),
/// instead of a guessed second per place.
#[tokio::test(start_paused = true)]
async fn a_cold_start_advises_soon_then_by_the_age_of_what_runs() {
    let scheduler = Scheduler::new(limits(1, 0));
    let Acquire::Admitted(p) = scheduler.acquire(0, &Share::default()) else {
        panic!()
    };
    let near = |got: Duration, want_ms: u64| {
        let want = Duration::from_millis(want_ms);
        assert!(
            got >= want && got <= want + Duration::from_millis(2),
            "{got:?} for {want:?}"
        );
    };
    tokio::time::advance(Duration::from_millis(10)).await;
    // 10 ms of age is no measure: the cold turn (0.1 s) a place.
    near(scheduler.advise(3), 300);
    tokio::time::advance(Duration::from_millis(1990)).await;
    // It has run 2 s: 2 s more, then 2 s a turn.
    near(scheduler.advise(3), 6000);
    drop(p);
    // One request took 2 s: that is the measure now; the slot is free.
    near(scheduler.advise(1), 1);
    near(scheduler.advise(3), 4000);
}

fn reserving(max: usize, levels: &[(i32, usize)]) -> Arc<Scheduler> {
    Scheduler::new(Limits {
        reserved: levels
            .iter()
            .map(|&(max_priority, slots)| Reservation {
                max_priority,
                slots,
            })
            .collect(),
        ..limits(max, 1000)
    })
}

fn admitted(a: Acquire) -> Permit {
    match a {
        Acquire::Admitted(p) => p,
        Acquire::Queued(_) => panic!("queued, expected admitted"),
        Acquire::Rejected(e) => panic!("rejected: {e}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_reserved_slot_is_kept_for_urgent_work() {
    // max_concurrency 2, one slot only for priority <= 0.
    let s = reserving(2, &[(0, 1)]);
    let flood_running = admitted(s.acquire(10, &Share::default()));
    let mut flood: Vec<Ticket> = (0..100)
        .map(|_| match s.acquire(10, &Share::default()) {
            Acquire::Queued(t) => t,
            _ => panic!("the flood must queue: the other slot is reserved"),
        })
        .collect();
    assert_eq!(s.snapshot().running, 1);
    // An urgent request starts at once, while the flood's request still runs.
    let urgent = admitted(s.acquire(0, &Share::default()));
    assert_eq!(s.snapshot().running, 2);
    let st = s.snapshot();
    assert_eq!(st.reservations[0].used, 1);
    assert_eq!(st.reservations[0].free, 0);
    // The urgent one ends: its slot is not handed to the flood.
    drop(urgent);
    assert_eq!(s.snapshot().running, 1);
    assert!(
        flood[0].try_take().is_none(),
        "the flood never uses the reserved slot"
    );
    assert_eq!(s.snapshot().reservations[0].free, 1);
    // The flood's own slot turns over without pause.
    drop(flood_running);
    assert!(matches!(flood[0].try_take(), Some(Ok(_))));
    assert_eq!(s.snapshot().running, 1);
}

#[tokio::test(start_paused = true)]
async fn an_urgent_waiter_takes_a_freed_slot_before_the_flood() {
    let s = reserving(2, &[(0, 1)]);
    let a = admitted(s.acquire(10, &Share::default()));
    let b = admitted(s.acquire(-5, &Share::default()));
    // Both slots busy: an urgent request queues ahead of the flood.
    let mut flood = match s.acquire(10, &Share::default()) {
        Acquire::Queued(t) => t,
        _ => panic!("queued"),
    };
    let mut urgent = match s.acquire(0, &Share::default()) {
        Acquire::Queued(t) => t,
        _ => panic!("queued"),
    };
    drop(a);
    let got = urgent.try_take();
    assert!(matches!(got, Some(Ok(_))), "most urgent first");
    assert!(flood.try_take().is_none());
    drop((got, b));
}

#[tokio::test(start_paused = true)]
async fn reservation_levels_nest() {
    // Of 4: one slot for <= 0, one more for <= -10.
    let s = reserving(4, &[(0, 1), (-10, 1)]);
    let batch: Vec<Permit> = (0..2)
        .map(|_| admitted(s.acquire(5, &Share::default())))
        .collect();
    assert!(
        matches!(s.acquire(5, &Share::default()), Acquire::Queued(_)),
        "batch gets 2"
    );
    let _normal = admitted(s.acquire(-5, &Share::default()));
    let _urgent = admitted(s.acquire(-20, &Share::default()));
    assert_eq!(s.snapshot().running, 4);
    drop(batch);
}

#[tokio::test(start_paused = true)]
async fn a_request_waiting_past_promote_after_is_served_before_more_urgent_ones() {
    let scheduler = Scheduler::new(Limits {
        promote_after: Some(Duration::from_secs(10)),
        ..limits(1, 10)
    });
    let Acquire::Admitted(busy) = scheduler.acquire(0, &Share::default()) else {
        panic!()
    };
    let Acquire::Queued(mut batch) = scheduler.acquire(10, &Share::default()) else {
        panic!()
    };
    tokio::time::advance(Duration::from_secs(6)).await;
    let Acquire::Queued(mut chat) = scheduler.acquire(0, &Share::default()) else {
        panic!()
    };
    // At 6 s the urgent one still goes first...
    drop(busy);
    let running = chat.try_take().expect("dispatched").expect("a permit");
    let Acquire::Queued(mut chat2) = scheduler.acquire(0, &Share::default()) else {
        panic!()
    };
    // ... but at 11 s the batch request has waited past 10 s: it is next,
    // ahead of the more urgent chat2.
    tokio::time::advance(Duration::from_secs(5)).await;
    drop(running);
    assert!(chat2.try_take().is_none());
    let promoted = batch.try_take().expect("promoted").expect("a permit");
    assert_eq!(promoted.priority(), 10);
}

#[tokio::test(start_paused = true)]
async fn a_capped_tenant_waits_while_others_take_the_free_slots() {
    let scheduler = Scheduler::new(limits(3, 10));
    let capped = Share {
        id: 1,
        max_in_flight: 1,
        name: http::HeaderValue::from_static("capped"),
        ..Share::default()
    };
    let other = Share {
        id: 2,
        name: http::HeaderValue::from_static("other"),
        ..Share::default()
    };
    let Acquire::Admitted(first) = scheduler.acquire(0, &capped) else {
        panic!()
    };
    let Acquire::Queued(mut second) = scheduler.acquire(0, &capped) else {
        panic!("at its cap: it waits though slots are free")
    };
    // The other tenant is not held up behind it.
    let Acquire::Admitted(_o1) = scheduler.acquire(0, &other) else {
        panic!("a free slot, and the waiter ahead cannot use it")
    };
    let Acquire::Admitted(_o2) = scheduler.acquire(0, &other) else {
        panic!()
    };
    assert!(second.try_take().is_none());
    drop(first);
    let p = second.try_take().expect("its turn").expect("a permit");
    let s = scheduler.snapshot();
    assert_eq!((s.running, s.waiting), (3, 0));
    drop(p);
}

#[tokio::test(start_paused = true)]
async fn draining_starts_only_what_can_finish_and_refuses_the_rest() {
    let scheduler = Scheduler::new(limits(1, 10));
    // Measured: a request takes 2 s.
    let Acquire::Admitted(p) = scheduler.acquire(0, &Share::default()) else {
        panic!()
    };
    tokio::time::advance(Duration::from_secs(2)).await;
    drop(p);
    let Acquire::Admitted(running) = scheduler.acquire(0, &Share::default()) else {
        panic!()
    };
    let Acquire::Queued(mut first) = scheduler.acquire(0, &Share::default()) else {
        panic!()
    };
    let Acquire::Queued(mut second) = scheduler.acquire(0, &Share::default()) else {
        panic!()
    };
    scheduler.drain(tokio::time::Instant::now() + Duration::from_secs(5));
    // Nothing new is taken in.
    let Acquire::Rejected(e) = scheduler.acquire(0, &Share::default()) else {
        panic!("a draining scheduler admits nothing new")
    };
    assert_eq!(e.reason(), Reason::Closed);
    assert_eq!(e.retry_after(), Duration::from_secs(5));
    // At 1 s the running one ends; the first waiter can still finish by 5 s.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(scheduler.shed_late(), 0);
    drop(running);
    let started = first.try_take().expect("dispatched").expect("a permit");
    // At 3.5 s a 2 s request would end after the deadline: refused.
    tokio::time::advance(Duration::from_millis(2500)).await;
    drop(started);
    assert!(second.try_take().is_none(), "not started so late");
    assert_eq!(scheduler.shed_late(), 1);
    let err = second.try_take().expect("answered").unwrap_err();
    assert_eq!(err.reason(), Reason::Closed);
    assert_eq!(err.retry_after(), Duration::from_millis(1500));
}

fn within(scheduler: &Arc<Scheduler>, priority: i32, deadline: Option<u64>) -> Acquire {
    scheduler.acquire_within(
        priority,
        &Share::default(),
        deadline.map(Duration::from_millis),
        || None,
    )
}

/// Within a priority the nearest deadline goes first, then those without
/// one in their fair order; a more urgent priority still goes before all.
#[tokio::test(start_paused = true)]
async fn the_nearest_deadline_goes_first_within_a_priority() {
    let scheduler = Scheduler::new(limits(1, 10));
    let Acquire::Admitted(busy) = within(&scheduler, 0, None) else {
        panic!("the slot is free")
    };
    let mut tickets = Vec::new();
    for (name, priority, deadline) in [
        ("none-1", 0, None),
        ("20s", 0, Some(20_000)),
        ("none-2", 0, None),
        ("10s", 0, Some(10_000)),
        ("urgent", -1, None),
        ("later-priority-5s", 3, Some(5_000)),
    ] {
        let Acquire::Queued(t) = within(&scheduler, priority, deadline) else {
            panic!("{name} queues: nothing measured, nothing predicted")
        };
        tickets.push((name, t));
    }
    tickets.sort_by_key(|(_, t)| t.place());
    let order: Vec<&str> = tickets.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        order,
        [
            "urgent",
            "10s",
            "20s",
            "none-1",
            "none-2",
            "later-priority-5s"
        ]
    );
    // And served so.
    drop(busy);
    let mut served = Vec::new();
    let mut waiting: Vec<_> = tickets.into_iter().collect();
    while !waiting.is_empty() {
        let (name, ticket) = waiting.remove(0);
        let permit = ticket.wait().await.expect("in its turn");
        served.push(name);
        drop(permit);
    }
    assert_eq!(served, order);
}

/// A queued request whose own deadline passes leaves with 429
/// `deadline_exceeded` then, not at `queue_timeout`.
#[tokio::test(start_paused = true)]
async fn a_deadline_bounds_the_wait_and_queue_timeout_stays_the_ceiling() {
    let scheduler = Scheduler::new(limits(1, 10));
    let svc = ServiceBuilder::new()
        .layer(AdmissionLayer::new(crate::route::one_row(
            scheduler.clone(),
        )))
        .service(recorder(Arc::default()));
    let _busy = svc.clone().oneshot(req(0, "busy")).await.unwrap();
    let with = |ms: u64| {
        let mut r = req(0, "waits");
        r.extensions_mut().get_mut::<Admit>().unwrap().deadline = Some(Duration::from_millis(ms));
        r
    };
    let short = tokio::spawn(svc.clone().oneshot(with(2_000)));
    // Longer than queue_timeout (30 s): clamped to it.
    let long = tokio::spawn(svc.clone().oneshot(with(600_000)));
    tokio::time::sleep(Duration::from_millis(1_900)).await;
    assert_eq!(scheduler.snapshot().waiting, 2);
    let err = short.await.unwrap().unwrap_err();
    let d = describe(&*err);
    assert_eq!((d.status.as_u16(), d.code), (429, "deadline_exceeded"));
    assert!(d.retry_after.is_some());
    assert_eq!(scheduler.snapshot().waiting, 1);
    tokio::time::sleep(Duration::from_secs(27)).await;
    assert_eq!(
        scheduler.snapshot().waiting,
        1,
        "still within queue_timeout"
    );
    let err = long.await.unwrap().unwrap_err();
    assert_eq!(describe(&*err).code, "queue_timeout");
}

/// With the turn time measured, a request whose predicted start is past
/// its deadline is refused at once, with advice; one whose deadline
/// leaves room queues. A deadline of zero waits for nothing.
#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_start_in_time_is_refused_at_once() {
    let scheduler = Scheduler::new(limits(1, 50));
    // Zero: admitted when a slot is free, refused when it would wait.
    let Acquire::Admitted(p) = within(&scheduler, 0, Some(0)) else {
        panic!("a free slot starts at once")
    };
    tokio::time::advance(Duration::from_secs(1)).await;
    drop(p);
    for _ in 0..20 {
        let Acquire::Admitted(p) = within(&scheduler, 0, None) else {
            panic!()
        };
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(p);
    }
    // One running (just started), five queued: the sixth place starts in
    // about six turns of one second.
    let Acquire::Admitted(_running) = within(&scheduler, 0, None) else {
        panic!()
    };
    let mut queued = Vec::new();
    for _ in 0..5 {
        let Acquire::Queued(t) = within(&scheduler, 0, None) else {
            panic!()
        };
        queued.push(t);
    }
    let Acquire::Rejected(zero) = within(&scheduler, 0, Some(0)) else {
        panic!("a deadline of zero does not wait")
    };
    assert_eq!(zero.reason(), Reason::Deadline);
    // Behind the five (a less urgent priority): about six seconds away.
    let Acquire::Rejected(late) = within(&scheduler, 1, Some(3_000)) else {
        panic!("six seconds away: refused at once")
    };
    assert_eq!(late.reason(), Reason::Deadline);
    assert!(
        late.retry_after() >= Duration::from_secs(3),
        "{:?}",
        late.retry_after()
    );
    assert_eq!(scheduler.snapshot().waiting, 5, "the refused never queued");
    let Acquire::Queued(_fits) = within(&scheduler, 1, Some(12_000)) else {
        panic!("twelve seconds leave room")
    };
    // At their priority a deadline puts it ahead of those without: the
    // first place is a turn away, within two seconds.
    let Acquire::Queued(_ahead) = within(&scheduler, 0, Some(2_000)) else {
        panic!("first in line, it starts in time")
    };
}
