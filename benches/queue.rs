//! The admission queue under load: 10,000 waiting requests of mixed
//! priorities, then one enqueue + one dispatch per iteration.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};

use anteroom::admission::queue::{PriorityQueue, Push};

const WAITING: usize = 10_000;

/// Priorities as an eval mix sees them: mostly batch (10), some interactive
/// (0), a few urgent (-5) and background (20) ones.
fn priority(i: usize) -> i32 {
    match i % 20 {
        0 => -5,
        1..=3 => 0,
        4 => 20,
        _ => 10,
    }
}

fn filled() -> PriorityQueue<u64> {
    let mut q = PriorityQueue::new(WAITING * 2);
    for i in 0..WAITING {
        q.push(priority(i), i as u64);
    }
    q
}

fn bench_queue(c: &mut Criterion) {
    let mut group = c.benchmark_group("queue");
    group.bench_function("push+pop with 10k waiting", |b| {
        let mut q = filled();
        let mut i = WAITING;
        b.iter(|| {
            i += 1;
            q.push(priority(i), i as u64);
            black_box(q.pop());
        });
    });
    group.bench_function("push+remove (cancel) with 10k waiting", |b| {
        let mut q = filled();
        let mut i = WAITING;
        b.iter(|| {
            i += 1;
            if let Push::Queued(k) = q.push(priority(i), i as u64) {
                black_box(q.remove(&k));
            }
        });
    });
    group.bench_function("evict from a full 10k queue", |b| {
        b.iter_batched_ref(
            || {
                let mut q = PriorityQueue::new(WAITING);
                for i in 0..WAITING {
                    q.push(10, i as u64);
                }
                q
            },
            |q| black_box(q.push(0, 1)),
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

/// The same through the scheduler, with its lock, channels and tickets.
fn bench_scheduler(c: &mut Criterion) {
    use anteroom::admission::{Acquire, Limits, Scheduler};
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
    });
    let Acquire::Admitted(first) = scheduler.acquire(0) else {
        panic!("the first is admitted")
    };
    let mut running = Some(first);
    // Tickets ordered as the queue serves them: the first one is the one a
    // freed slot goes to.
    let mut tickets = BTreeMap::new();
    for i in 0..WAITING {
        let Acquire::Queued(t) = scheduler.acquire(priority(i)) else {
            panic!("room")
        };
        tickets.insert(t.key(), t);
    }
    let mut i = WAITING;
    c.bench_function("scheduler: enqueue + dispatch with 10k waiting", |b| {
        b.iter(|| {
            i += 1;
            if let Acquire::Queued(t) = scheduler.acquire(priority(i)) {
                tickets.insert(t.key(), t);
            }
            // The running request ends: its slot goes to the most urgent waiter.
            drop(running.take());
            let (_, mut next) = tickets.pop_first().expect("someone waits");
            running = Some(next.try_take().expect("granted").expect("a permit"));
        });
    });
}

criterion_group!(benches, bench_queue, bench_scheduler);
criterion_main!(benches);
