//! The admission queue under load: 10,000 waiting requests of 100 tenants
//! (weights 1 to 3) at 5 priorities, then one enqueue + one dispatch per
//! iteration; the same through the scheduler with its lock and channels.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use tokio::time::Instant;

use anteroom::admission::queue::{PriorityQueue, Push};
use anteroom::types::Share;

const WAITING: usize = 10_000;
const TENANTS: u64 = 100;

/// Priorities as an eval mix sees them: mostly batch (10), some interactive
/// (0), a few urgent (-5), background (20) and bulk (30) ones.
fn priority(i: usize) -> i32 {
    match i % 20 {
        0 => -5,
        1..=3 => 0,
        4 => 20,
        5 => 30,
        _ => 10,
    }
}

/// Tenants take turns unevenly (a stride through 100), weights 1 to 3.
fn tenant(i: usize) -> (u64, u32) {
    let t = (i as u64 * 37) % TENANTS;
    (t, 1 + (t % 3) as u32)
}

fn push(q: &mut PriorityQueue<u64>, i: usize, now: Instant) -> Push<u64> {
    let (t, w) = tenant(i);
    q.push(priority(i), t, w, now, i as u64)
}

fn filled(now: Instant) -> PriorityQueue<u64> {
    let mut q = PriorityQueue::new(WAITING * 2);
    for i in 0..WAITING {
        push(&mut q, i, now);
    }
    q
}

fn bench_queue(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let now = Instant::now();
    let mut group = c.benchmark_group("queue");
    group.bench_function("push+pop with 10k waiting, 100 tenants", |b| {
        let mut q = filled(now);
        let mut i = WAITING;
        b.iter(|| {
            i += 1;
            push(&mut q, i, now);
            black_box(q.pop(now));
        });
    });
    group.bench_function("push+pop with 10k waiting, aging on", |b| {
        let mut q = filled(now);
        q.set_promote_after(Some(std::time::Duration::from_secs(60)));
        let mut i = WAITING;
        b.iter(|| {
            i += 1;
            push(&mut q, i, now);
            black_box(q.pop(now));
        });
    });
    group.bench_function("push+remove (cancel) with 10k waiting", |b| {
        let mut q = filled(now);
        let mut i = WAITING;
        b.iter(|| {
            i += 1;
            if let Push::Queued(k) = push(&mut q, i, now) {
                black_box(q.remove(&k));
            }
        });
    });
    group.bench_function("evict from a full 10k queue", |b| {
        b.iter_batched_ref(
            || {
                let mut q = PriorityQueue::new(WAITING);
                for i in 0..WAITING {
                    let (t, w) = tenant(i);
                    q.push(10, t, w, now, i as u64);
                }
                q
            },
            |q| black_box(q.push(0, 1, 1, now, 1)),
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

/// The same through the scheduler, with its lock, channels and tickets.
fn bench_scheduler(c: &mut Criterion) {
    use anteroom::admission::{Acquire, Scheduler};
    use anteroom::config::Limits;
    use std::collections::BTreeMap;
    use std::time::Duration;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let scheduler = Scheduler::new(Limits {
        max_concurrency: 1,
        max_queue: WAITING * 2,
        queue_timeout: Duration::from_secs(3600),
        retry_after_cap: Duration::from_secs(60),
        reserved: vec![],
        promote_after: None,
        preempt: None,
    });
    let shares: Vec<Share> = (0..TENANTS)
        .map(|t| Share {
            id: t,
            weight: 1 + (t % 3) as u32,
            max_in_flight: 0,
            name: http::HeaderValue::from_str(&format!("tenant-{t}")).unwrap(),
        })
        .collect();
    let share = |i: usize| &shares[tenant(i).0 as usize];
    let Acquire::Admitted(first) = scheduler.acquire(0, &Share::default()) else {
        panic!("the first is admitted")
    };
    let mut running = Some(first);
    // Tickets ordered as the queue serves them: the first one is the one a
    // freed slot goes to.
    let mut tickets = BTreeMap::new();
    for i in 0..WAITING {
        let Acquire::Queued(t) = scheduler.acquire(priority(i), share(i)) else {
            panic!("room")
        };
        tickets.insert(t.place(), t);
    }
    let mut i = WAITING;
    c.bench_function(
        "scheduler: enqueue + dispatch with 10k waiting, 100 tenants",
        |b| {
            b.iter(|| {
                i += 1;
                if let Acquire::Queued(t) = scheduler.acquire(priority(i), share(i)) {
                    tickets.insert(t.place(), t);
                }
                // The running request ends: its slot goes to the most urgent waiter.
                drop(running.take());
                let (_, mut next) = tickets.pop_first().expect("someone waits");
                running = Some(next.try_take().expect("granted").expect("a permit"));
            });
        },
    );
}

criterion_group!(benches, bench_queue, bench_scheduler);
criterion_main!(benches);
