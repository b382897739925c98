//! Cluster mode (`[cluster]`): replicas that share each upstream's
//! concurrency limit through Redis (or Valkey).
//!
//! Each replica keeps its own queue; what it shares is the slots. A request
//! that its replica's scheduler lets go (a local slot: at most the limit per
//! replica) then needs a *lease* from Redis before it is sent: one atomic
//! script (`scripts::ACQUIRE`) registers it as a waiter, by its priority
//! and the server's clock at its arrival, and grants it a slot when fewer
//! than the limit are held and no more urgent (or, at its priority,
//! earlier) waiter of any replica is ahead of it for the free ones. A
//! request not granted waits for a slot to be given back anywhere (pub/sub,
//! with a short poll in case a message is lost) and asks again, keeping its
//! place. The lease is given back when the response body ends or is
//! dropped, one more round trip, off the request's path.
//!
//! Leases and waiters live a `lease_time` unless renewed: each replica
//! renews all of its own in one heartbeat per upstream every third of it, so
//! a replica that dies gives its slots back within a lease time. Every call
//! is bounded by `timeout`; while Redis cannot be reached, `on_unavailable`
//! decides: `local` admits up to this replica's share of the limit (the
//! limit divided by the replicas alive at the last heartbeat), `closed`
//! answers 503 `cluster_unavailable`. Either way a log line and
//! `anteroom_cluster_up` say so at once, and the next call that succeeds
//! returns to the shared state.
//!
//! A key's `requests_per_minute` and `tokens_per_minute` are checked and
//! charged in the lease's first call (all or nothing); token corrections
//! from `usage` go with this replica's next charge for the key or its next
//! heartbeat. Each release counts a completion; the heartbeat reads the
//! count, and the cluster's drain rate is what a replica that measured no
//! turn of its own advises from.
//!
//! How close to one global queue this gets: among the requests presented
//! to Redis (each replica presents at most the limit at once, its most
//! urgent when they were presented), a freed slot goes to the most urgent,
//! earliest one. A request that arrives at a replica whose presented
//! requests are all waiting goes after them, whatever its priority.

mod layer;
mod scripts;

pub use layer::{ClusterLayer, Clustered, LeaseBody, ResponseFuture};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::Notify;

use crate::config::{ClusterConfig, OnUnavailable};
use crate::types::TokenBudget;
use crate::BoxError;

/// How often a waiting request asks again when no message came (a lost
/// pub/sub message, a lease that expired).
const POLL: Duration = Duration::from_millis(200);

/// Heartbeats over which the cluster's drain rate is measured.
const DRAIN_WINDOW: usize = 5;

/// A key's limits, held across replicas.
#[derive(Debug)]
pub(crate) struct Rates {
    /// The key's name.
    pub tenant: Arc<str>,
    /// Its requests per minute (0: none).
    pub requests_per_minute: u32,
    /// Its tokens-per-minute budget and this request's estimate, and the
    /// request's tap, told when the shared budget is charged (so that its
    /// correction goes there too).
    pub tokens: Option<(Arc<TokenBudget>, u64, crate::telemetry::Tap)>,
}

/// The cluster's completions for one upstream at the last heartbeats:
/// (the server's clock in ms, completions so far).
#[derive(Debug, Default)]
struct Drain {
    samples: std::collections::VecDeque<(i64, i64)>,
}

impl Drain {
    /// Completions per second over the window, once two heartbeats saw it.
    fn rate(&self) -> Option<f64> {
        let (&(t0, d0), &(t1, d1)) = (self.samples.front()?, self.samples.back()?);
        (t1 > t0).then(|| (d1 - d0) as f64 * 1000.0 / (t1 - t0) as f64)
    }

    /// Note the count `done` at `at_ms`; the rate now.
    fn note(&mut self, at_ms: i64, done: i64) -> Option<f64> {
        if self
            .samples
            .back()
            .is_some_and(|&(t, d)| at_ms <= t || done < d)
        {
            // The clock went back or Redis restarted empty: start again.
            self.samples.clear();
        }
        self.samples.push_back((at_ms, done));
        if self.samples.len() > DRAIN_WINDOW {
            self.samples.pop_front();
        }
        self.rate()
    }
}

/// A key's share of its limits while Redis is away (`local`): its limits
/// divided by the replicas alive at the last heartbeat.
#[derive(Debug)]
struct Fallback {
    /// What it was made for: replicas alive, the key's requests and tokens
    /// per minute.
    made_for: (usize, u32, u32),
    requests: Option<crate::types::tokens::Limiter>,
    tokens: Option<Arc<TokenBudget>>,
}

/// A replica's handle on the shared state.
pub struct Cluster {
    client: redis::Client,
    conn: arc_swap::ArcSwapOption<redis::aio::ConnectionManager>,
    /// Told when the first connection is made.
    connected: Notify,
    /// `{anteroom:NAME}`: every key starts with it (one hash slot).
    prefix: String,
    channel: String,
    replica: String,
    lease_ms: u64,
    timeout: Duration,
    on_unavailable: OnUnavailable,
    acquire: redis::Script,
    release: redis::Script,
    renew: redis::Script,
    adjust: redis::Script,
    /// Whose schedulers hear the cluster's drain rate.
    router: std::sync::OnceLock<std::sync::Weak<crate::route::Router>>,
    /// Per upstream: the cluster's completions at the last heartbeats.
    drains: Mutex<HashMap<String, Drain>>,
    /// Keys with a tokens-per-minute limit seen here: their corrections go
    /// to Redis with the heartbeat.
    budgets: Mutex<HashMap<Arc<str>, Arc<TokenBudget>>>,
    /// Per key: its share of its limits while Redis is away.
    fallbacks: Mutex<HashMap<Arc<str>, Fallback>>,
    /// Per upstream: the members this replica holds or waits with.
    mine: Mutex<HashMap<String, HashSet<String>>>,
    /// Per upstream: woken when a slot is given back anywhere.
    wakes: Mutex<HashMap<String, Arc<Notify>>>,
    /// Per upstream: requests running on this replica's share alone.
    alone: Mutex<HashMap<String, usize>>,
    /// Per upstream: leases this replica holds.
    leased: Mutex<HashMap<String, usize>>,
    next: AtomicU64,
    up: AtomicBool,
    replicas: AtomicUsize,
    metrics: ClusterMetrics,
}

/// What cluster mode exports.
#[derive(Clone, Debug)]
pub struct ClusterMetrics {
    /// 1 while Redis answers, 0 while it does not.
    pub up: IntGauge,
    /// Calls to Redis that failed or timed out.
    pub errors: IntCounter,
    /// Leases this replica holds now.
    pub held_here: IntGauge,
    /// Leases held in all (every replica), at the last heartbeat.
    pub held_all: IntGauge,
    /// Replicas alive at the last heartbeat.
    pub replicas: IntGauge,
    /// Leases found expired at a heartbeat (their requests ran on).
    pub lost: IntCounter,
    /// Round trips to Redis that were answered, by how long they took.
    pub round_trip: prometheus::Histogram,
    /// Requests completed per second by every replica, per upstream.
    pub drain: prometheus::GaugeVec,
}

impl ClusterMetrics {
    fn new(registry: &prometheus::Registry) -> Self {
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("metric definitions are valid");
            let _ = registry.register(Box::new(g.clone()));
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("metric definitions are valid");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let round_trip = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "anteroom_cluster_redis_seconds",
                "Time of each answered call to the cluster's Redis (a script: acquire, release, heartbeat).",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
        )
        .expect("metric definitions are valid");
        let _ = registry.register(Box::new(round_trip.clone()));
        let drain = prometheus::GaugeVec::new(
            prometheus::Opts::new(
                "anteroom_cluster_completions_per_second",
                "Requests completed per second by every replica, per upstream, over the last heartbeats (the drain rate refusals are advised from until this replica measured its own).",
            ),
            &["upstream"],
        )
        .expect("metric definitions are valid");
        let _ = registry.register(Box::new(drain.clone()));
        Self {
            round_trip,
            drain,
            up: gauge(
                "anteroom_cluster_up",
                "1 while the cluster's Redis answers; 0 while it does not (on_unavailable applies).",
            ),
            errors: counter(
                "anteroom_cluster_redis_errors_total",
                "Calls to the cluster's Redis that failed or took longer than cluster.timeout.",
            ),
            held_here: gauge(
                "anteroom_cluster_leases_here",
                "Upstream slots (leases) this replica holds now.",
            ),
            held_all: gauge(
                "anteroom_cluster_leases",
                "Upstream slots (leases) held by every replica, at the last heartbeat (summed over upstreams).",
            ),
            replicas: gauge(
                "anteroom_cluster_replicas",
                "Replicas alive at the last heartbeat.",
            ),
            lost: counter(
                "anteroom_cluster_leases_lost_total",
                "Leases found expired at a heartbeat while their request ran (Redis lost them, or the heartbeat was late).",
            ),
        }
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("prefix", &self.prefix)
            .field("replica", &self.replica)
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Redis could not be reached, with `on_unavailable = "closed"` (503).
#[derive(Debug)]
pub struct Unavailable;

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the cluster's shared state (Redis) cannot be reached; retry after the advised delay",
        )
    }
}

impl std::error::Error for Unavailable {}

/// How one call to Redis failed.
#[derive(Debug)]
enum CallError {
    Redis(redis::RedisError),
    TimedOut,
    NotConnected,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Redis(e) => write!(f, "{e}"),
            CallError::TimedOut => f.write_str("no answer within cluster.timeout"),
            CallError::NotConnected => f.write_str("not connected"),
        }
    }
}

/// A slot a request holds: given back when dropped.
#[derive(Debug)]
pub struct Lease {
    cluster: Arc<Cluster>,
    upstream: String,
    /// Its member in Redis; `None`: a slot of this replica's share alone.
    member: Option<String>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        match self.member.take() {
            Some(m) => {
                self.cluster.metrics.held_here.dec();
                if let Some(n) = self.cluster.leased.lock().get_mut(&self.upstream) {
                    *n = n.saturating_sub(1);
                }
                self.cluster.give_back(&self.upstream, m);
            }
            None => {
                if let Some(n) = self.cluster.alone.lock().get_mut(&self.upstream) {
                    *n = n.saturating_sub(1);
                }
                self.cluster.wake(&self.upstream).notify_waiters();
            }
        }
    }
}

/// A waiter's place, given up if it is dropped before its grant.
struct Place {
    cluster: Arc<Cluster>,
    upstream: String,
    member: Option<String>,
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(m) = self.member.take() {
            self.cluster.give_back(&self.upstream, m);
        }
    }
}

impl Cluster {
    /// The handle for `config`, registering its metrics in `registry`. It
    /// connects when [`start`](Self::start) runs.
    pub fn new(
        config: &ClusterConfig,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Self>, BoxError> {
        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(|e| format!("cluster.redis_url: {:?}", e.kind()))?;
        let prefix = format!("{{anteroom:{}}}", config.name);
        let replica = format!(
            "{}-{:016x}",
            std::process::id(),
            crate::random::splitmix(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or_default()
            )
        );
        Ok(Arc::new(Self {
            client,
            conn: arc_swap::ArcSwapOption::empty(),
            connected: Notify::new(),
            channel: format!("{prefix}:freed"),
            prefix,
            replica,
            lease_ms: u64::try_from(config.lease_time.as_millis()).unwrap_or(u64::MAX),
            timeout: config.timeout,
            on_unavailable: config.on_unavailable,
            acquire: redis::Script::new(&scripts::acquire()),
            release: redis::Script::new(scripts::RELEASE),
            renew: redis::Script::new(&scripts::renew()),
            adjust: redis::Script::new(&scripts::adjust()),
            router: std::sync::OnceLock::new(),
            drains: Mutex::default(),
            budgets: Mutex::default(),
            fallbacks: Mutex::default(),
            mine: Mutex::default(),
            wakes: Mutex::default(),
            alone: Mutex::default(),
            leased: Mutex::default(),
            next: AtomicU64::new(0),
            up: AtomicBool::new(false),
            replicas: AtomicUsize::new(1),
            metrics: ClusterMetrics::new(registry),
        }))
    }

    /// Connect, and keep the heartbeat and the wake-ups running, until the
    /// returned tasks are aborted; `router`'s schedulers hear the cluster's
    /// drain rate.
    pub fn start(
        self: &Arc<Self>,
        router: &Arc<crate::route::Router>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let _ = self.router.set(Arc::downgrade(router));
        let connect = {
            let this = self.clone();
            tokio::spawn(async move {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(this.timeout))
                    .set_response_timeout(Some(this.timeout))
                    .set_max_delay(Duration::from_secs(2));
                loop {
                    match redis::aio::ConnectionManager::new_with_config(
                        this.client.clone(),
                        config.clone(),
                    )
                    .await
                    {
                        Ok(conn) => {
                            this.conn.store(Some(Arc::new(conn)));
                            this.connected.notify_waiters();
                            this.succeeded();
                            tracing::info!(replica = %this.replica, "cluster: connected to Redis");
                            return;
                        }
                        Err(e) => {
                            this.failed(&CallError::Redis(e));
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            })
        };
        let heartbeat = {
            let this = self.clone();
            tokio::spawn(async move {
                let every =
                    Duration::from_millis(this.lease_ms / 3).max(Duration::from_millis(100));
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    this.heartbeat().await;
                }
            })
        };
        let wakes = {
            let this = self.clone();
            tokio::spawn(async move { this.listen().await })
        };
        vec![connect, heartbeat, wakes]
    }

    /// Whether Redis answered the last call.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// This replica's id in Redis.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The cluster as this replica sees it, for `/status`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "replica": self.replica,
            "redis_up": self.is_up(),
            "replicas_alive": self.metrics.replicas.get(),
            "leases_here": self.metrics.held_here.get(),
            "leases_all": self.metrics.held_all.get(),
            "redis_errors": self.metrics.errors.get(),
            "leases_lost": self.metrics.lost.get(),
            "completions_per_second": self
                .drains
                .lock()
                .iter()
                .filter_map(|(u, d)| Some((u.clone(), serde_json::Value::from(d.rate()?))))
                .collect::<serde_json::Map<String, serde_json::Value>>(),
            "on_unavailable": match self.on_unavailable {
                OnUnavailable::Local => "local",
                OnUnavailable::Closed => "closed",
            },
        })
    }

    /// Its metrics.
    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    fn keys(&self, upstream: &str) -> [String; 4] {
        let p = &self.prefix;
        [
            format!("{p}:u:{upstream}:leases"),
            format!("{p}:u:{upstream}:waiters"),
            format!("{p}:u:{upstream}:waiting"),
            format!("{p}:u:{upstream}:done"),
        ]
    }

    fn tokens_key(&self, tenant: &str) -> String {
        format!("{}:tpm:{tenant}", self.prefix)
    }

    fn wake(&self, upstream: &str) -> Arc<Notify> {
        self.wakes
            .lock()
            .entry(upstream.to_owned())
            .or_default()
            .clone()
    }

    fn succeeded(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            self.metrics.up.set(1);
            tracing::info!(replica = %self.replica, "cluster: Redis answers; limits are shared");
        }
    }

    fn failed(&self, e: &CallError) {
        self.metrics.errors.inc();
        if self.up.swap(false, Ordering::Relaxed) || self.metrics.errors.get() == 1 {
            self.metrics.up.set(0);
            let mode = match self.on_unavailable {
                OnUnavailable::Local => "local: this replica admits its share alone",
                OnUnavailable::Closed => "closed: admitted requests get 503",
            };
            tracing::warn!(error = %e, on_unavailable = mode, "cluster: Redis cannot be reached");
        }
    }

    /// Run one call, bounded by `timeout`.
    async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, CallError> {
        let conn = match self.conn.load_full() {
            Some(conn) => conn,
            None => {
                // Starting: the first connection may be a moment away.
                let connected = self.connected.notified();
                tokio::pin!(connected);
                connected.as_mut().enable();
                match self.conn.load_full() {
                    Some(conn) => conn,
                    None => {
                        let _ = tokio::time::timeout(self.timeout, connected).await;
                        match self.conn.load_full() {
                            Some(conn) => conn,
                            None => {
                                let e = CallError::NotConnected;
                                self.failed(&e);
                                return Err(e);
                            }
                        }
                    }
                }
            }
        };
        let mut conn = (*conn).clone();
        let started = tokio::time::Instant::now();
        let result =
            match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(CallError::Redis(e)),
                Err(_) => Err(CallError::TimedOut),
            };
        match &result {
            Ok(_) => {
                self.metrics
                    .round_trip
                    .observe(started.elapsed().as_secs_f64());
                self.succeeded();
            }
            Err(e) => self.failed(e),
        }
        result
    }

    /// Wait for a slot of `upstream` (of `limit` in all) at `priority`,
    /// for a key held to `rates` across replicas (checked and charged with
    /// the first answered call, or against this replica's share of them
    /// while Redis is away).
    pub(crate) async fn lease(
        self: Arc<Self>,
        upstream: String,
        limit: usize,
        priority: i32,
        rates: Option<Rates>,
    ) -> Result<Lease, BoxError> {
        let (rate_key, tokens_key) = match &rates {
            Some(r) => (
                format!("{}:rpm:{}", self.prefix, r.tenant),
                self.tokens_key(&r.tenant),
            ),
            None => (
                format!("{}:rpm:-", self.prefix),
                format!("{}:tpm:-", self.prefix),
            ),
        };
        // Rates checked (none to check, or checked once).
        let mut rated = rates.is_none();
        let wake = self.wake(&upstream);
        let mut place = Place {
            cluster: self.clone(),
            upstream: upstream.clone(),
            member: None,
        };
        loop {
            // Registered before asking, so a slot given back meanwhile wakes it.
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let member = place.member.clone().unwrap_or_default();
            let suffix = format!(
                "{}:{}",
                self.replica,
                self.next.fetch_add(1, Ordering::Relaxed)
            );
            // What the key's limits are charged, the first time: a request,
            // and its tokens' estimate with the corrections due.
            let (rpm, tpm, owed, charge) = match (&rates, rated) {
                (Some(r), false) => match &r.tokens {
                    Some((budget, estimate, _)) => {
                        let owed = budget.take_shared();
                        let charge = i64::try_from(*estimate)
                            .unwrap_or(i64::MAX)
                            .saturating_add(owed);
                        (
                            r.requests_per_minute,
                            budget.per_minute().get(),
                            owed,
                            charge,
                        )
                    }
                    None => (r.requests_per_minute, 0, 0, 0),
                },
                _ => (0, 0, 0, 0),
            };
            let owed_back = || {
                if let Some((budget, _, _)) = rates.as_ref().and_then(|r| r.tokens.as_ref()) {
                    budget.owe_shared(owed);
                }
            };
            let [leases, waiters, waiting, _] = self.keys(&upstream);
            let mut invocation = self.acquire.prepare_invoke();
            invocation
                .key(leases)
                .key(waiters)
                .key(waiting)
                .key(&rate_key)
                .key(&tokens_key)
                .arg(limit)
                .arg(self.lease_ms)
                .arg(&member)
                .arg(priority)
                .arg(suffix)
                .arg(rpm)
                .arg(tpm)
                .arg(charge);
            match self.call::<(i64, String, usize)>(invocation).await {
                Ok((refused @ (-1 | -2), wait_ms, _)) => {
                    // Over the key's rate, counted across replicas.
                    owed_back();
                    let wait = Duration::from_millis(wait_ms.parse::<u64>().unwrap_or(1000));
                    return Err(if refused == -1 {
                        crate::error::RateLimited::requests(wait)
                    } else {
                        crate::error::RateLimited::tokens(wait)
                    }
                    .into());
                }
                Ok((granted, member, _held)) => {
                    if !rated {
                        rated = true;
                        if let Some((r, (budget, _, tap))) =
                            rates.as_ref().and_then(|r| Some((r, r.tokens.as_ref()?)))
                        {
                            tap.tokens_shared();
                            self.budgets.lock().insert(r.tenant.clone(), budget.clone());
                        }
                    }
                    self.mine
                        .lock()
                        .entry(upstream.clone())
                        .or_default()
                        .insert(member.clone());
                    if granted == 1 {
                        place.member = None;
                        self.metrics.held_here.inc();
                        *self.leased.lock().entry(upstream.clone()).or_default() += 1;
                        return Ok(Lease {
                            cluster: self.clone(),
                            upstream,
                            member: Some(member),
                        });
                    }
                    place.member = Some(member);
                }
                Err(_) => {
                    if !rated {
                        owed_back();
                    }
                    match self.on_unavailable {
                        OnUnavailable::Closed => return Err(Unavailable.into()),
                        OnUnavailable::Local => {
                            if let (false, Some(r)) = (rated, &rates) {
                                self.fallback_rates(r)?;
                                rated = true;
                            }
                            if let Some(lease) = self.alone(&upstream, limit) {
                                return Ok(lease);
                            }
                        }
                    }
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// While Redis is away (`local`): check and charge `rates` at this
    /// replica's share of them (each limit divided by the replicas alive at
    /// the last heartbeat). The tokens are charged their estimate only:
    /// corrections are for the shared budget.
    fn fallback_rates(&self, rates: &Rates) -> Result<(), BoxError> {
        let alive = self.replicas.load(Ordering::Relaxed).max(1);
        let tpm = rates
            .tokens
            .as_ref()
            .map_or(0, |(b, _, _)| b.per_minute().get());
        let share = |per: u32| per.div_ceil(u32::try_from(alive).unwrap_or(u32::MAX));
        let mut fallbacks = self.fallbacks.lock();
        let made_for = (alive, rates.requests_per_minute, tpm);
        let fresh = || Fallback {
            made_for,
            requests: std::num::NonZeroU32::new(share(rates.requests_per_minute))
                .map(crate::types::tokens::limiter),
            tokens: TokenBudget::new(share(tpm)),
        };
        let f = fallbacks.entry(rates.tenant.clone()).or_insert_with(fresh);
        if f.made_for != made_for {
            // Another count of replicas, or the key's limits reloaded.
            *f = fresh();
        }
        if let Some(limiter) = &f.requests {
            if let Err(not_until) = limiter.check() {
                let wait = crate::types::tokens::wait_until(&not_until);
                return Err(crate::error::RateLimited::requests(wait).into());
            }
        }
        if let (Some(budget), Some((_, estimate, _))) = (&f.tokens, &rates.tokens) {
            budget
                .charge(*estimate)
                .map_err(crate::error::RateLimited::tokens)?;
        }
        Ok(())
    }

    /// A slot of this replica's share alone, while Redis is away.
    fn alone(self: &Arc<Self>, upstream: &str, limit: usize) -> Option<Lease> {
        let alive = self.replicas.load(Ordering::Relaxed).max(1);
        let share = limit.div_ceil(alive).max(1);
        // Leases granted before Redis went away run on in this share.
        let held = self.leased.lock().get(upstream).copied().unwrap_or(0);
        let mut alone = self.alone.lock();
        let n = alone.entry(upstream.to_owned()).or_default();
        if *n + held >= share {
            return None;
        }
        *n += 1;
        Some(Lease {
            cluster: self.clone(),
            upstream: upstream.to_owned(),
            member: None,
        })
    }

    /// Give `member`'s slot (or place) back, off the caller's path.
    fn give_back(self: &Arc<Self>, upstream: &str, member: String) {
        if let Some(m) = self.mine.lock().get_mut(upstream) {
            m.remove(&member);
        }
        // Dropped outside any runtime (the process ending): it expires.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        let upstream = upstream.to_owned();
        runtime.spawn(async move {
            let [leases, waiters, waiting, done] = this.keys(&upstream);
            let mut invocation = this.release.prepare_invoke();
            invocation
                .key(leases)
                .key(waiters)
                .key(waiting)
                .key(done)
                .arg(&member)
                .arg(&this.channel)
                .arg(&upstream);
            let _ = this.call::<u8>(invocation).await;
            // Whether or not it reached Redis (then it expires), one of
            // ours may go now.
            this.wake(&upstream).notify_waiters();
        });
    }

    /// Renew every lease and place this replica has, one call per upstream.
    async fn heartbeat(&self) {
        // Every upstream configured (so the drain rate of one this replica
        // has not sent to yet is known too) and any still held from before
        // a reload.
        let mut names: Vec<String> = self.wakes.lock().keys().cloned().collect();
        if let Some(router) = self.router.get().and_then(std::sync::Weak::upgrade) {
            for row in &router.table().rows {
                if !names.iter().any(|n| *n == *row.config.name) {
                    names.push(row.config.name.to_string());
                }
            }
        }
        let mut all: Vec<(String, Vec<String>)> = {
            let mine = self.mine.lock();
            names
                .into_iter()
                .map(|u| {
                    let members = mine
                        .get(&u)
                        .map(|m| m.iter().cloned().collect())
                        .unwrap_or_default();
                    (u, members)
                })
                .collect()
        };
        if all.is_empty() {
            // No upstream asked for yet: still say this replica is alive.
            all.push((String::new(), Vec::new()));
        }
        let mut held_all = 0;
        for (upstream, members) in all {
            let [leases, _, waiting, done] = self.keys(&upstream);
            let mut invocation = self.renew.prepare_invoke();
            invocation
                .key(leases)
                .key(waiting)
                .key(format!("{}:replicas", self.prefix))
                .key(done)
                .arg(self.lease_ms)
                .arg(&self.replica);
            for m in &members {
                invocation.arg(m);
            }
            let Ok((alive, lost, held, done, now)) =
                self.call::<(usize, u64, i64, i64, i64)>(invocation).await
            else {
                continue;
            };
            self.replicas.store(alive.max(1), Ordering::Relaxed);
            self.metrics.replicas.set(alive as i64);
            held_all += held;
            if lost > 0 {
                self.metrics.lost.inc_by(lost);
                tracing::warn!(upstream, lost, "cluster: leases expired while held (Redis lost them, or a heartbeat came late)");
            }
            if !upstream.is_empty() {
                let rate = self
                    .drains
                    .lock()
                    .entry(upstream.clone())
                    .or_default()
                    .note(now, done);
                self.heard_drain(&upstream, rate, alive.max(1));
            }
        }
        self.metrics.held_all.set(held_all);
        self.send_corrections().await;
    }

    /// Tell the schedulers of `upstream` the cluster's drain `rate`
    /// (completions per second across replicas): a slot turns, at this
    /// replica's share of it (`alive` replicas), every limit × alive ÷ rate.
    fn heard_drain(&self, upstream: &str, rate: Option<f64>, alive: usize) {
        if let Some(r) = rate {
            self.metrics.drain.with_label_values(&[upstream]).set(r);
        }
        let Some(router) = self.router.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let table = router.table();
        for row in table.rows.iter().filter(|r| &*r.config.name == upstream) {
            let limit = row.scheduler.max_concurrency() as f64;
            let turn = rate.filter(|&r| r > 0.0).map(|r| limit * alive as f64 / r);
            row.scheduler.set_shared_turn(turn);
        }
    }

    /// Send the token corrections due to the keys' shared budgets, in one
    /// call; what could not be sent stays due.
    async fn send_corrections(&self) {
        let due: Vec<(Arc<str>, Arc<TokenBudget>, i64)> = self
            .budgets
            .lock()
            .iter()
            .filter_map(|(name, b)| {
                let n = b.take_shared();
                (n != 0).then(|| (name.clone(), b.clone(), n))
            })
            .collect();
        if due.is_empty() {
            return;
        }
        let mut invocation = self.adjust.prepare_invoke();
        for (name, budget, n) in &due {
            invocation
                .key(self.tokens_key(name))
                .arg(budget.per_minute().get())
                .arg(*n);
        }
        if self.call::<usize>(invocation).await.is_err() {
            for (_, budget, n) in &due {
                budget.owe_shared(*n);
            }
        }
    }

    /// Wake this replica's waiters whenever a slot is given back anywhere.
    async fn listen(self: Arc<Self>) {
        use futures_core::Stream;
        loop {
            let pubsub =
                match tokio::time::timeout(self.timeout, self.client.get_async_pubsub()).await {
                    Ok(Ok(mut p)) => {
                        match tokio::time::timeout(self.timeout, p.subscribe(&self.channel)).await {
                            Ok(Ok(())) => Some(p),
                            _ => None,
                        }
                    }
                    _ => None,
                };
            let Some(pubsub) = pubsub else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            let mut messages = pubsub.into_on_message();
            while let Some(msg) =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut messages).poll_next(cx)).await
            {
                if let Ok(upstream) = msg.get_payload::<String>() {
                    let wake = self.wakes.lock().get(&upstream).cloned();
                    if let Some(w) = wake {
                        w.notify_waiters();
                    }
                }
            }
            // The connection closed: every waiter asks again (a message
            // may have been missed), then subscribe again.
            for w in self.wakes.lock().values() {
                w.notify_waiters();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
