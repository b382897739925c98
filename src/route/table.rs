//! The upstream table: every upstream with its scheduler, health and
//! pause, replaced whole by a reload; picking one for a request.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::health::health_checks;
use crate::admission::{Acquire, Scheduler};
use crate::backoff::Cooldown;
use crate::config::ReplicaConfig;
use crate::error::ModelNotFound;
use crate::types::{Overloaded, Reason};
use crate::BoxError;

/// Health of one upstream (several upstreams only).
#[derive(Debug, Default)]
struct Health {
    ejected: AtomicBool,
    failures: AtomicU32,
}

/// One upstream as the request path sees it: its settings, its scheduler
/// (queue and limit), its health and its pause.
///
/// A reload that keeps an upstream (same name, or the only one before and
/// after) keeps its scheduler, so waiters keep their place; one that gives it
/// a new address also gives it a new `id`, which tells each worker to open a
/// new connection pool. A removed upstream stays in the table, `retired`:
/// nothing new goes there, its waiters are queued elsewhere and its running
/// requests finish. Indices into the table ([`Route`](crate::types::Route)) therefore never move.
#[derive(Debug)]
pub struct Row {
    /// Names its address: a new one when the address changes.
    pub id: u64,
    /// Its settings.
    pub config: ReplicaConfig,
    /// Its admission state.
    pub scheduler: Arc<Scheduler>,
    /// The pause a 429/503 from it puts on its requests.
    pub cooldown: Arc<Cooldown>,
    /// What its backend says of itself.
    pub backend: Arc<crate::backend::Backend>,
    health: Arc<Health>,
    /// Removed by a reload.
    pub retired: bool,
}

/// Every upstream ever configured since start, by index.
#[derive(Debug)]
pub struct Table {
    /// Bumped by every reload that changes an address or the set.
    pub generation: u64,
    /// By index; retired ones included.
    pub rows: Vec<Arc<Row>>,
    /// The indices in service (not retired), in config order.
    order: Vec<usize>,
}

impl Table {
    /// The upstreams in service, in config order.
    pub(crate) fn active(&self) -> impl Iterator<Item = (usize, &Arc<Row>)> {
        self.order.iter().map(|&i| (i, &self.rows[i]))
    }

    /// How many upstreams are in service.
    pub(crate) fn active_len(&self) -> usize {
        self.order.len()
    }

    /// The first in config order: where requests that are not routed go.
    pub fn first(&self) -> usize {
        self.order.first().copied().unwrap_or(0)
    }

    /// Upstream `i` (the last one for an index out of range: never, since
    /// indices come from this table or an older, shorter one).
    pub fn row(&self, i: usize) -> &Arc<Row> {
        &self.rows[i.min(self.rows.len() - 1)]
    }
}

/// What a reload did to the set of upstreams.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SetChange {
    /// Names of upstreams added.
    pub added: Vec<String>,
    /// Names of upstreams removed.
    pub removed: Vec<String>,
    /// Names of upstreams given a new address (or upstream key).
    pub readdressed: Vec<String>,
}

impl SetChange {
    /// Nothing was added, removed or re-addressed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.readdressed.is_empty()
    }
}

/// The upstreams, their schedulers and their health: shared by the route
/// layer, admission (to requeue), back-off (to resend elsewhere), the
/// upstream client (which reports failures) and the health checks. A reload
/// replaces the table ([`Router::reconfigure`]); each request reads it
/// without a lock.
#[derive(Debug)]
pub struct Router {
    table: arc_swap::ArcSwap<Table>,
    /// Serialises reloads (never taken on the request path).
    reloading: parking_lot::Mutex<()>,
    next_id: AtomicU64,
    /// Consecutive failures that take an upstream out of service.
    eject_after: u32,
    /// When to come back if no upstream is healthy.
    retry_after: Duration,
    next: AtomicUsize,
    /// Set once health checks run: a reload starts them for new upstreams.
    health: std::sync::OnceLock<crate::config::HealthConfig>,
    /// Stops the health checks (the proxy stopped).
    closed: AtomicBool,
    /// Set once backends are watched: a reload starts watchers for new
    /// upstreams (the identification interval).
    watching: std::sync::OnceLock<Duration>,
    /// The requests waiting, by id (`GET /status/requests/{id}`).
    waiting: Arc<crate::admission::listed::Waiting>,
    /// The shared slots, in cluster mode.
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

impl Router {
    /// Route among `replicas`, whose schedulers are `schedulers` (same
    /// order). An upstream failing `eject_after` times in a row (requests or
    /// probes) is out of service until a probe succeeds.
    pub fn new(
        replicas: Vec<ReplicaConfig>,
        schedulers: Vec<Arc<Scheduler>>,
        eject_after: u32,
        retry_after: Duration,
    ) -> Arc<Self> {
        assert_eq!(replicas.len(), schedulers.len());
        assert!(!replicas.is_empty(), "at least one upstream");
        let rows: Vec<Arc<Row>> = replicas
            .into_iter()
            .zip(schedulers)
            .enumerate()
            .map(|(i, (config, scheduler))| Arc::new(Row::new(i as u64, config, scheduler)))
            .collect();
        let n = rows.len();
        Arc::new(Self {
            table: arc_swap::ArcSwap::from_pointee(Table {
                generation: 0,
                rows,
                order: (0..n).collect(),
            }),
            reloading: parking_lot::Mutex::new(()),
            next_id: AtomicU64::new(n as u64),
            eject_after: eject_after.max(1),
            retry_after,
            next: AtomicUsize::new(0),
            health: std::sync::OnceLock::new(),
            closed: AtomicBool::new(false),
            watching: std::sync::OnceLock::new(),
            waiting: Arc::default(),
            cluster: std::sync::OnceLock::new(),
        })
    }

    /// Share the upstreams' slots through `cluster` (before any stack is
    /// built; later calls change nothing).
    pub fn set_cluster(&self, cluster: Arc<crate::cluster::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// The shared slots, in cluster mode.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.get()
    }

    /// The requests waiting, by id.
    pub fn waiting(&self) -> &Arc<crate::admission::listed::Waiting> {
        &self.waiting
    }

    /// The table as it is now.
    pub fn table(&self) -> arc_swap::Guard<Arc<Table>> {
        self.table.load()
    }

    /// How many upstreams are in service.
    pub fn len(&self) -> usize {
        self.table.load().active_len()
    }

    /// Whether none is (never: validation needs one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every scheduler, retired upstreams' included (they may still run
    /// requests): what a drain must reach.
    pub fn all_schedulers(&self) -> Vec<Arc<Scheduler>> {
        let mut out: Vec<Arc<Scheduler>> = Vec::new();
        for s in &self.table.load().rows {
            if !out.iter().any(|x| Arc::ptr_eq(x, &s.scheduler)) {
                out.push(s.scheduler.clone());
            }
        }
        out
    }

    /// Ask upstream `i`'s scheduler for a slot (`replay`: see
    /// [`Scheduler::acquire_as`]).
    pub fn acquire(
        &self,
        i: usize,
        admit: &crate::types::Admit,
        replay: impl FnOnce() -> Option<crate::admission::Replayable>,
    ) -> Acquire {
        self.table.load().row(i).scheduler.acquire_within(
            admit.priority,
            &admit.share,
            admit.deadline,
            replay,
        )
    }

    /// Upstream `i`'s pause.
    pub fn cooldown(&self, i: usize) -> Arc<Cooldown> {
        self.table.load().row(i).cooldown.clone()
    }

    /// Take a new list of upstreams (a config reload), with `limits` for
    /// their schedulers. An upstream is known by its name (or, when there is
    /// one before and after, as the same one): it keeps its scheduler, and
    /// its health and pools unless its address changed. New ones get a
    /// scheduler of their own; removed ones retire and their waiters are
    /// queued at the others.
    pub fn reconfigure(
        self: &Arc<Self>,
        replicas: Vec<ReplicaConfig>,
        limits: &crate::config::Limits,
        adaptive: bool,
    ) -> SetChange {
        let _one_at_a_time = self.reloading.lock();
        let old = self.table.load_full();
        let mut rows: Vec<Arc<Row>> = old.rows.clone();
        let mut order = Vec::with_capacity(replicas.len());
        let mut change = SetChange::default();
        let single = replicas.len() == 1 && old.order.len() == 1;
        for config in replicas {
            let limits = crate::config::Limits {
                max_concurrency: config.max_concurrency,
                ..limits.clone()
            };
            let kept = if single {
                Some(old.order[0])
            } else {
                old.active()
                    .find(|(_, s)| s.config.name == config.name)
                    .map(|(i, _)| i)
            };
            let Some(i) = kept else {
                change.added.push(config.name.clone());
                let scheduler = Scheduler::new(limits);
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                order.push(rows.len());
                rows.push(Arc::new(Row::new(id, config, scheduler)));
                continue;
            };
            let was = &old.rows[i];
            was.scheduler.reconfigure(&limits, adaptive);
            let moved = !was.config.origin.same_address(&config.origin);
            // Another address (or another `backend`) is read anew, and
            // gets a new id: each worker's pools then take the new backend.
            let rebacked = was.config.backend != config.backend;
            let backend = if moved || rebacked {
                Arc::new(crate::backend::Backend::new(config.backend))
            } else {
                was.backend.clone()
            };
            // Read by each request: it changes in place.
            backend.set_stream_upgrade(config.stream_upgrade);
            backend.set_max_tokens(config.max_tokens);
            backend.set_aliases(&config.models);
            if moved {
                change.readdressed.push(config.name.clone());
            }
            rows[i] = Arc::new(Row {
                id: if moved || rebacked {
                    self.next_id.fetch_add(1, Ordering::Relaxed)
                } else {
                    was.id
                },
                config,
                scheduler: was.scheduler.clone(),
                cooldown: was.cooldown.clone(),
                backend,
                health: if moved {
                    Arc::default()
                } else {
                    was.health.clone()
                },
                retired: false,
            });
            order.push(i);
        }
        let mut retiring = Vec::new();
        for (i, was) in old.active() {
            if !order.contains(&i) {
                change.removed.push(was.config.name.clone());
                retiring.push(was.scheduler.clone());
                rows[i] = Arc::new(Row {
                    retired: true,
                    config: was.config.clone(),
                    scheduler: was.scheduler.clone(),
                    cooldown: was.cooldown.clone(),
                    backend: was.backend.clone(),
                    health: was.health.clone(),
                    id: was.id,
                });
            }
        }
        // Pools follow the generation: any row with a new id needs one.
        let new_ids = order
            .iter()
            .any(|&i| old.rows.get(i).is_none_or(|o| o.id != rows[i].id));
        let generation = old.generation + u64::from(!change.is_empty() || new_ids);
        let fresh: Vec<u64> = order
            .iter()
            .map(|&i| rows[i].id)
            .filter(|id| !old.active().any(|(_, s)| s.id == *id))
            .collect();
        self.table.store(Arc::new(Table {
            generation,
            rows,
            order,
        }));
        // Now that the table no longer offers them, move the waiters of
        // removed upstreams, and probe the new addresses.
        for s in retiring {
            s.reroute_waiting();
        }
        if let Some(health) = self.health.get() {
            for &id in &fresh {
                self.spawn_health_check(id, health.clone());
            }
        }
        // A row whose backend is new (a new address or `backend`) is read
        // anew; its old watcher ends with its id.
        if let Some(&every) = self.watching.get() {
            let table = self.table.load();
            for (_, s) in table.active() {
                let known = old
                    .active()
                    .any(|(_, o)| Arc::ptr_eq(&o.backend, &s.backend));
                if !known {
                    self.spawn_watch(s.id, every);
                }
            }
        }
        change
    }

    /// Upstream `i`'s name.
    fn name(&self, i: usize) -> String {
        self.table.load().row(i).config.name.clone()
    }

    /// Is upstream `i` in service?
    pub fn is_healthy(&self, i: usize) -> bool {
        let table = self.table.load();
        let s = table.row(i);
        !s.retired && !s.health.ejected.load(Ordering::Acquire)
    }

    /// A request to upstream `i` (or a probe) got an answer (`true`) or
    /// could not reach it (`false`). With a single upstream nothing is
    /// ejected: there is nowhere else to go.
    pub fn report(&self, i: usize, ok: bool) {
        let table = self.table.load();
        if table.active_len() < 2 {
            return;
        }
        let row = table.row(i);
        let h = &row.health;
        if ok {
            h.failures.store(0, Ordering::Release);
            return;
        }
        let n = h.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.eject_after && !h.ejected.swap(true, Ordering::AcqRel) {
            let moved = row.scheduler.reroute_waiting();
            tracing::warn!(
                upstream = %row.config.name,
                failures = n,
                requeued = moved,
                "upstream taken out of service"
            );
        }
    }

    /// A health probe of upstream `i` succeeded: back in service.
    pub(crate) fn readmit(&self, i: usize) {
        let table = self.table.load();
        let h = &table.row(i).health;
        h.failures.store(0, Ordering::Release);
        if h.ejected.swap(false, Ordering::AcqRel) {
            tracing::info!(upstream = %self.name(i), "upstream back in service");
        }
    }

    /// The upstream for a request for `model`: among those that serve it
    /// and are in service (not `exclude`), the least loaded for its weight.
    pub(crate) fn pick(
        &self,
        model: Option<&str>,
        exclude: Option<usize>,
    ) -> Result<usize, BoxError> {
        // Upstreams that name the model come first; `"*"` ones take the rest,
        // and what the named ones cannot take while out of service.
        let named = |r: &ReplicaConfig| model.is_some_and(|m| r.models.names(m));
        let any = |r: &ReplicaConfig| r.models.any() || model.is_none();
        let table = self.table.load();
        let mut served = false;
        // One turn of the round-robin per pick, whichever tier decides: a
        // turn per tier moved it by two, so with two upstreams ties always
        // went to the same one.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for tier in [&named as &dyn Fn(&ReplicaConfig) -> bool, &any] {
            let (best, seen) = self.least_loaded(&table, tier, exclude, start);
            served |= seen;
            if let Some(i) = best {
                return Ok(i);
            }
        }
        if served {
            Err(Overloaded::new(Reason::Rerouted, self.retry_after).into())
        } else {
            Err(ModelNotFound::new(model.unwrap_or_default().to_owned(), served_by(&table)).into())
        }
    }

    /// The in-service upstream among those `serves` accepts with the least
    /// outstanding work per weight (ties: round-robin), and whether any
    /// upstream serves at all.
    fn least_loaded(
        &self,
        table: &Table,
        serves: &dyn Fn(&ReplicaConfig) -> bool,
        exclude: Option<usize>,
        start: usize,
    ) -> (Option<usize>, bool) {
        let n = table.order.len();
        let mut best: Option<(u64, usize)> = None;
        let mut served = false;
        for k in 0..n {
            let i = table.order[(start + k) % n];
            let s = &table.rows[i];
            if !serves(&s.config) {
                continue;
            }
            served = true;
            if Some(i) == exclude || s.health.ejected.load(Ordering::Acquire) {
                continue;
            }
            let (waiting, running) = s.scheduler.snapshot_counts();
            // Outstanding work per unit of weight, in thousandths.
            let load = (waiting + running) as u64 * 1000 / u64::from(s.config.weight.max(1));
            if best.is_none_or(|(l, _)| load < l) {
                best = Some((load, i));
            }
        }
        (best.map(|(_, i)| i), served)
    }

    /// Probe every upstream in service (now and added by reloads) while
    /// there are several, until [`close`](Self::close).
    pub fn start_health_checks(self: &Arc<Self>, health: crate::config::HealthConfig) {
        if self.health.set(health.clone()).is_err() {
            return;
        }
        let ids: Vec<u64> = self.table.load().active().map(|(_, s)| s.id).collect();
        for id in ids {
            self.spawn_health_check(id, health.clone());
        }
    }

    fn spawn_health_check(self: &Arc<Self>, id: u64, health: crate::config::HealthConfig) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(health_checks(Arc::downgrade(self), id, health));
            }
            Err(_) => tracing::warn!(id, "no runtime to run health checks on"),
        }
    }

    /// Stop the health checks and backend watchers.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Whether [`close`](Self::close) was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Read every upstream's backend (now and added by reloads) until
    /// [`close`](Self::close), identifying it every `every` (see
    /// [`backend`](crate::backend)).
    pub(crate) fn start_watching_backends(self: &Arc<Self>, every: Duration) {
        if self.watching.set(every).is_err() {
            return;
        }
        let ids: Vec<u64> = self.table.load().active().map(|(_, s)| s.id).collect();
        for id in ids {
            self.spawn_watch(id, every);
        }
    }

    fn spawn_watch(self: &Arc<Self>, id: u64, every: Duration) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let weak = Arc::downgrade(self);
                let find = move || {
                    let router = weak.upgrade().filter(|r| !r.is_closed())?;
                    let table = router.table();
                    let (_, row) = table.active().find(|(_, s)| s.id == id)?;
                    Some((
                        row.config.origin.clone(),
                        row.backend.clone(),
                        row.config.name.clone(),
                    ))
                };
                rt.spawn(crate::backend::watch(Box::new(find), every));
            }
            Err(_) => tracing::warn!(id, "no runtime to watch the backend on"),
        }
    }

    /// The index and address of upstream `id`, while it is in service.
    pub(super) fn find(&self, id: u64) -> Option<(usize, crate::origin::Origin, usize)> {
        let table = self.table.load();
        let found = table
            .active()
            .find(|(_, s)| s.id == id)
            .map(|(i, s)| (i, s.config.origin.clone(), table.active_len()));
        found
    }
}

impl Row {
    fn new(id: u64, config: ReplicaConfig, scheduler: Arc<Scheduler>) -> Self {
        let backend = crate::backend::Backend::new(config.backend);
        backend.set_stream_upgrade(config.stream_upgrade);
        backend.set_max_tokens(config.max_tokens);
        backend.set_aliases(&config.models);
        Self {
            id,
            backend: Arc::new(backend),
            config,
            scheduler,
            cooldown: Arc::default(),
            health: Arc::default(),
            retired: false,
        }
    }
}

/// A table of one upstream around `scheduler`, for unit tests of the
/// steps that see the router (its address is never dialled).
#[cfg(test)]
pub(crate) fn one_row(scheduler: Arc<Scheduler>) -> Arc<Router> {
    let config = ReplicaConfig {
        name: "upstream".into(),
        origin: crate::origin::Origin::parse("http://127.0.0.1:9").expect("a valid origin"),
        models: crate::config::Models::Any,
        // Read only by a reload; the scheduler keeps its own limits.
        max_concurrency: 1,
        weight: 1,
        backend: crate::config::backend::Setting::Auto,
        stream_upgrade: None,
        max_tokens: Default::default(),
    };
    Router::new(vec![config], vec![scheduler], 3, Duration::from_secs(1))
}

impl crate::admission::Schedulers for Router {
    fn acquire(
        &self,
        route: usize,
        admit: &crate::types::Admit,
        replay: &dyn Fn() -> Option<crate::admission::Replayable>,
    ) -> Acquire {
        Router::acquire(self, route, admit, replay)
    }

    fn waiting(&self) -> Option<&Arc<crate::admission::listed::Waiting>> {
        Some(&self.waiting)
    }

    fn room(
        &self,
        route: usize,
        priority: crate::types::Priority,
    ) -> Option<crate::types::Allowance> {
        Some(self.table.load().row(route).scheduler.room(priority))
    }

    fn reroute(&self, model: Option<&str>, from: usize) -> Result<usize, BoxError> {
        self.pick(model, Some(from))
    }
}

impl crate::backoff::Targets for Router {
    fn cooldown(&self, route: usize) -> Arc<Cooldown> {
        Router::cooldown(self, route)
    }

    fn is_healthy(&self, route: usize) -> bool {
        Router::is_healthy(self, route)
    }

    fn reroute(&self, model: Option<&str>, from: usize) -> Result<usize, BoxError> {
        self.pick(model, Some(from))
    }

    fn unavailable_advice(&self) -> Duration {
        self.retry_after
    }
}

/// What the upstreams in service serve, for a 404.
fn served_by(table: &Table) -> String {
    let mut out: Vec<String> = Vec::new();
    for (_, s) in table.active() {
        if s.config.models.any() {
            out.push(format!("any model on `{}`", s.config.name));
        }
        for m in s.config.models.named() {
            if !out.contains(&m.name) {
                out.push(m.name.clone());
            }
        }
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Limits, Models};

    fn limits(n: usize) -> Limits {
        Limits {
            max_concurrency: n,
            max_queue: 10,
            queue_timeout: Duration::from_secs(30),
            retry_after_cap: Duration::from_secs(60),
            reserved: vec![],
            promote_after: None,
            preempt: None,
        }
    }

    fn replica(name: &str, port: u16, models: &[&str]) -> ReplicaConfig {
        ReplicaConfig {
            name: name.into(),
            origin: crate::origin::Origin::parse(&format!("http://127.0.0.1:{port}"))
                .expect("a valid origin"),
            models: if models.is_empty() {
                Models::Any
            } else {
                Models::List(models.iter().map(|&m| m.into()).collect())
            },
            max_concurrency: 1,
            weight: 1,
            backend: crate::config::backend::Setting::Auto,
            stream_upgrade: None,
            max_tokens: Default::default(),
        }
    }

    fn router(replicas: Vec<ReplicaConfig>) -> Arc<Router> {
        let schedulers = replicas
            .iter()
            .map(|r| Scheduler::new(limits(r.max_concurrency)))
            .collect();
        Router::new(replicas, schedulers, 2, Duration::from_secs(1))
    }

    fn names(r: &Router) -> Vec<String> {
        r.table()
            .active()
            .map(|(_, s)| s.config.name.clone())
            .collect()
    }

    #[test]
    fn a_reload_keeps_upstreams_by_name_and_never_moves_an_index() {
        let r = router(vec![replica("a", 1, &[]), replica("b", 2, &[])]);
        let (a, b) = {
            let t = r.table();
            (t.row(0).clone(), t.row(1).clone())
        };
        let change = r.reconfigure(
            vec![replica("c", 3, &[]), replica("a", 1, &[])],
            &limits(1),
            false,
        );
        assert_eq!(
            change,
            SetChange {
                added: vec!["c".into()],
                removed: vec!["b".into()],
                readdressed: vec![],
            }
        );
        let t = r.table();
        assert_eq!(t.generation, 1);
        // In config order, at their old indices; the new one appended.
        assert_eq!(names(&r), ["c", "a"]);
        assert_eq!(t.active().map(|(i, _)| i).collect::<Vec<_>>(), [2, 0]);
        assert!(Arc::ptr_eq(&t.row(0).scheduler, &a.scheduler));
        assert_eq!(t.row(0).id, a.id, "same address: same pools");
        // The removed one stays, retired, with its scheduler.
        assert!(t.row(1).retired);
        assert!(Arc::ptr_eq(&t.row(1).scheduler, &b.scheduler));
        assert!(!r.is_healthy(1));
        assert_eq!(
            r.all_schedulers().len(),
            3,
            "a drain reaches the retired one"
        );
        assert_eq!(t.first(), 2);
    }

    #[test]
    fn a_new_address_is_a_new_id_and_fresh_health_but_the_same_queue() {
        let r = router(vec![replica("a", 1, &[]), replica("b", 2, &[])]);
        let before = r.table().row(0).clone();
        r.report(0, false);
        let change = r.reconfigure(
            vec![replica("a", 9, &[]), replica("b", 2, &[])],
            &limits(1),
            false,
        );
        assert_eq!(change.readdressed, ["a"]);
        let t = r.table();
        assert_ne!(t.row(0).id, before.id);
        assert_eq!(t.row(0).health.failures.load(Ordering::Relaxed), 0);
        assert!(Arc::ptr_eq(&t.row(0).scheduler, &before.scheduler));
        assert_eq!(t.generation, 1);
        // The same set again: nothing changes, not even the generation.
        drop(t);
        let same = r.reconfigure(
            vec![replica("a", 9, &[]), replica("b", 2, &[])],
            &limits(1),
            false,
        );
        assert!(same.is_empty());
        assert_eq!(r.table().generation, 1);
    }

    #[test]
    fn one_upstream_before_and_after_is_the_same_one_whatever_its_name() {
        let r = router(vec![replica("upstream", 1, &[])]);
        let s = r.table().row(0).scheduler.clone();
        let renamed = ReplicaConfig {
            max_concurrency: 4,
            ..replica("renamed", 1, &[])
        };
        let change = r.reconfigure(vec![renamed], &limits(1), false);
        assert!(change.is_empty(), "{change:?}");
        assert!(Arc::ptr_eq(&r.table().row(0).scheduler, &s));
        assert_eq!(s.snapshot().max_concurrency, 4, "its own limit applies");
    }

    #[tokio::test]
    async fn the_waiters_of_a_removed_upstream_are_sent_to_be_queued_elsewhere() {
        let r = router(vec![replica("a", 1, &[]), replica("b", 2, &[])]);
        let Acquire::Admitted(_running) = r.acquire(1, &crate::types::Admit::new(0), || None)
        else {
            panic!("a free slot")
        };
        let Acquire::Queued(waiting) = r.acquire(1, &crate::types::Admit::new(0), || None) else {
            panic!("queued behind it")
        };
        r.reconfigure(vec![replica("a", 1, &[])], &limits(1), false);
        let refused = waiting.wait().await.expect_err("rerouted");
        assert_eq!(refused.reason(), Reason::Rerouted);
    }

    #[test]
    fn a_pick_prefers_who_names_the_model_then_the_least_loaded() {
        let r = router(vec![
            replica("any", 1, &[]),
            replica("m1", 2, &["m"]),
            replica("m2", 3, &["m"]),
        ]);
        // m1 busy: m2 is the less loaded of those naming it.
        let Acquire::Admitted(_busy) = r.acquire(1, &crate::types::Admit::new(0), || None) else {
            panic!()
        };
        for _ in 0..4 {
            assert_eq!(r.pick(Some("m"), None).unwrap(), 2);
        }
        // Excluded (its request is being rerouted): m1, busy as it is.
        assert_eq!(r.pick(Some("m"), Some(2)).unwrap(), 1);
        // A model nobody names goes to "*"; without a model, anywhere.
        assert_eq!(r.pick(Some("other"), None).unwrap(), 0);
        assert!(r.pick(None, None).is_ok());
    }

    #[test]
    fn a_model_nobody_serves_is_a_404_and_one_whose_upstreams_are_out_is_a_refusal() {
        let r = router(vec![
            replica("m1", 1, &["m"]),
            replica("m2", 2, &["m", "n"]),
        ]);
        let err = r.pick(Some("x"), None).unwrap_err();
        let missing = err
            .downcast_ref::<ModelNotFound>()
            .expect("model_not_found");
        assert!(missing.to_string().contains("m, n"), "{missing}");
        // Two failures in a row (eject_after) take m2 out of service.
        r.report(1, false);
        assert!(r.is_healthy(1));
        r.report(1, false);
        assert!(!r.is_healthy(1));
        let err = r.pick(Some("n"), None).unwrap_err();
        let refused = err.downcast_ref::<Overloaded>().expect("overloaded");
        assert_eq!(refused.reason(), Reason::Rerouted);
        // A probe that succeeds puts it back.
        r.readmit(1);
        assert_eq!(r.pick(Some("n"), None).unwrap(), 1);
        // An answer resets the count: failures must be consecutive.
        r.report(1, false);
        r.report(1, true);
        r.report(1, false);
        assert!(r.is_healthy(1));
    }

    #[test]
    fn a_single_upstream_is_never_taken_out_of_service() {
        let r = router(vec![replica("only", 1, &[])]);
        for _ in 0..10 {
            r.report(0, false);
        }
        assert!(r.is_healthy(0));
        assert_eq!(r.pick(Some("any"), None).unwrap(), 0);
    }
}
